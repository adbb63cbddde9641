"""``python -m service [--host H] [--port P] [--model PATH]``: serve a model with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.config import Settings
from service.logs import configure
from service.supervisor import serve

log = logging.getLogger("service")


def _settings_help() -> str:
    lines = ["environment variables (each setting; flags override):"]
    for name, field in Settings.model_fields.items():
        lines.append(f"  IMGSERVE_{name.upper():<30} {field.description} "
                     f"(default: {field.default})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve an ONNX image classifier over HTTP.",
        epilog=_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--model", type=Path, help="ONNX model file, or a model repository "
                        "directory (default: the shipped model)")
    parser.add_argument("--workers", type=int,
                        help="server processes (default: one per CPU core on CPU, 1 on CUDA)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_path": args.model,
                                   "workers": args.workers}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json)
    if not settings.model_path.exists():
        log.error("model file or repository %s not found (set --model or IMGSERVE_MODEL_PATH)",
                  settings.model_path)
        return 2
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
