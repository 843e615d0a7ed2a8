"""Emporium's shared service library: settings, database, auth, events, metrics, tracing, logging, health"""
