"""``vseinf serve``: a web page and JSON API over a gallery index (see :mod:`vseinf.serve.app`)."""

from .app import add_serve_parser, background_server, create_app, run_serve

__all__ = ["add_serve_parser", "background_server", "create_app", "run_serve"]
