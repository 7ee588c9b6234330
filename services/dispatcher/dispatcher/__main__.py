from __future__ import annotations

from contracts.runtime import serve


def main() -> None:
    from dispatcher.app import create_app

    serve(create_app, "dispatcher", default_port=8082)


if __name__ == "__main__":
    main()
