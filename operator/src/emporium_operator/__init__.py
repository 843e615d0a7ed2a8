"""Emporium operator: Postgres databases and RabbitMQ topology from custom resources"""
