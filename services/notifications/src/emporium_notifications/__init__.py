"""Emporium notifications service: event consumer, email and websocket"""
