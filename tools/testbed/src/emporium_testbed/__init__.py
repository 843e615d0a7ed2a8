"""Throwaway control plane, Postgres, RabbitMQ and SMTP sink for tests and the local platform"""
