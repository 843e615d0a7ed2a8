"""Emporium storefront: the web shop for customers and administrators."""
