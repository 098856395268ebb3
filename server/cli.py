"""`dovetail` command line: `dovetail serve [options]`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from pydantic import ValidationError

from server.settings import add_arguments, settings_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dovetail", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    add_arguments(serve)
    args = parser.parse_args(argv)

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"])
            print(f"dovetail: --{field.replace('_', '-')}: {problem['msg']}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve_forever(settings)
    return 2


def serve_forever(settings) -> int:
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_path = settings.model_path
    except FileNotFoundError as error:
        print(f"dovetail: {error}", file=sys.stderr)
        return 2
    if not model_path.is_file():
        print(f"dovetail: model file not found: {model_path}", file=sys.stderr)
        return 2
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """On SIGINT/SIGTERM: stop listening (uvicorn), refuse queued requests and give the
        running ones `shutdown_grace` seconds to end their responses properly (engine)."""

        def handle_exit(self, sig, frame) -> None:
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                engine.drain(settings.shutdown_grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_grace + 10)
    # uvicorn raises a captured SIGINT again once it has stopped
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
