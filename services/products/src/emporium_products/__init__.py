"""Emporium products service: the catalogue and stock"""
