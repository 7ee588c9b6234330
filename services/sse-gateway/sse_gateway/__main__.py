from __future__ import annotations

from contracts.runtime import serve


def main() -> None:
    from sse_gateway.app import create_app

    serve(create_app, "sse-gateway", default_port=8081)


if __name__ == "__main__":
    main()
