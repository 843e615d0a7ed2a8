"""Emporium users service: accounts, roles, JWTs and JWKS"""
