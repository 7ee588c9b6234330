from __future__ import annotations

from contracts.runtime import serve


def main() -> None:
    from comments.app import create_app

    serve(create_app, "comments", default_port=8080)


if __name__ == "__main__":
    main()
