"""Registration writes user.registered to the outbox in the same transaction (the relay publishes it)."""

from sqlalchemy import text

from .conftest import register

BY_EMAIL = "FROM outbox WHERE payload->'data'->>'email' = 'evt@example.com'"


async def test_registration_adds_one_user_registered_event(client, session):
    user = await register(client, email="evt@example.com", username="evt")
    rows = (await session.exec(text(f"SELECT type, payload {BY_EMAIL}"))).all()
    assert len(rows) == 1
    kind, payload = rows[0]
    assert kind == "user.registered"
    assert payload["data"] == {"user_id": str(user["id"]), "email": "evt@example.com", "username": "evt"}
    assert payload["version"] == 1 and payload["id"]

    duplicate = await client.post(
        "/users/register", json={"email": "evt@example.com", "username": "evt2", "password": "correct horse"}
    )
    assert duplicate.status_code == 409
    count = (await session.exec(text(f"SELECT count(*) {BY_EMAIL}"))).one()[0]
    assert count == 1
