from __future__ import annotations

from contracts.runtime import serve


def main() -> None:
    from push_sender.app import create_app

    serve(create_app, "push-sender", default_port=8084)


if __name__ == "__main__":
    main()
