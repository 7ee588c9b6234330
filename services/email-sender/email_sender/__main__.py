from __future__ import annotations

from contracts.runtime import serve


def main() -> None:
    from email_sender.app import create_app

    serve(create_app, "email-sender", default_port=8083)


if __name__ == "__main__":
    main()
