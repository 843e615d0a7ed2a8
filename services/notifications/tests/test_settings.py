"""Production settings refuse SMTP credentials that would cross the network in clear text."""

import pytest
from emporium_notifications.config import NotificationsSettings
from pydantic import ValidationError

PRODUCTION = {
    "environment": "production",
    "database_url": "postgresql://notifications_owner:Zr8s2k1x9Qw@db.emporium.svc:5432/notifications",
    "jwks_url": "http://users.emporium.svc.cluster.local:8000/.well-known/jwks.json",
}


def test_production_refuses_smtp_credentials_without_tls():
    with pytest.raises(ValidationError, match="SMTP credentials without SMTP_STARTTLS"):
        NotificationsSettings(**PRODUCTION, smtp_username="mailer", smtp_password="Zr8s2k1x9Qw")


def test_production_accepts_smtp_credentials_over_starttls_and_no_credentials():
    credentials = {"smtp_username": "mailer", "smtp_password": "Zr8s2k1x9Qw"}
    NotificationsSettings(**PRODUCTION, **credentials, smtp_starttls=True)
    NotificationsSettings(**PRODUCTION)


def test_production_refuses_a_missing_jwks_url():
    with pytest.raises(ValidationError, match="JWKS_URL"):
        NotificationsSettings(**{**PRODUCTION, "jwks_url": None})
