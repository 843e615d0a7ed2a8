"""An SMTP sink (aiosmtpd) that keeps every message it receives.

Messages are kept in memory (for tests in the same process) and written as .eml files to a directory
(for tests and people looking from outside, e.g. the local platform's mail folder).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import functools
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from .process import free_port


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @functools.cached_property
    def message(self) -> EmailMessage:
        """Parsed on first use: parsing every message cost a benchmark's client more than its requests."""
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def subject(self) -> str:
        return str(self.message["Subject"] or "")

    def text(self) -> str:
        """Every text part of the message, joined (HTML included)."""
        parts = []
        for part in self.message.walk():
            if part.get_content_maintype() == "text":
                parts.append(part.get_content())
        return "\n".join(parts)


class _Handler:
    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server, session, envelope: Envelope) -> str:
        raw = envelope.content
        mail = ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), raw)  # type: ignore[arg-type]
        self.sink.record(mail, raw)  # type: ignore[arg-type]
        return "250 Message accepted for delivery"


@dataclass
class SMTPSink:
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    maildir: Path | None = None

    def __post_init__(self) -> None:
        self.messages: list[ReceivedMail] = []
        self._lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port)

    def record(self, mail: ReceivedMail, raw: bytes) -> None:
        with self._lock:
            self.messages.append(mail)
            count = len(self.messages)
        if self.maildir:
            self.maildir.mkdir(parents=True, exist_ok=True)
            (self.maildir / f"{time.time():.6f}-{count}.eml").write_bytes(raw)

    def start(self) -> SMTPSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait_for(self, count: int, timeout: float = 20.0, to: str | None = None) -> list[ReceivedMail]:
        """Wait until at least count messages (to the given recipient, if any) have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [m for m in self.messages if to is None or to in m.rcpt_tos]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an SMTP sink that stores messages as .eml files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    args = parser.parse_args()
    sink = SMTPSink(args.host, args.port, args.maildir).start()
    print(f"SMTP sink on {args.host}:{args.port}, mail in {args.maildir}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
