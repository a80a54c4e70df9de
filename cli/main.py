"""The `infer` command line: a thin typer app over the library. Heavy modules load lazily."""
from __future__ import annotations

import sys

import typer

app = typer.Typer(name="infer", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Quantized LLM inference for CPUs: run, chat with, convert and measure GGUF models.")

@app.callback()
def _root():
    """Quantized LLM inference for CPUs: run, chat with, convert and measure GGUF models."""


# Each command lives in its own module with a `register(app)` function.
_COMMANDS = ["generate", "inspect", "convert_cmd", "chat", "bench", "perplexity", "calibrate", "serve"]


def _register():
    import importlib
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(f"infer.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"infer.cli.{name}":
                continue
            raise
        mod.register(app)


def main(argv=None):
    from infer.errors import InferError
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except InferError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
