"""Emporium orders service: orders, their state machine and outbox"""
