"""The web app over an index (:mod:`vseinf.serve.app`) and its host/CSP policy (:mod:`.security`);
the ``vseinf serve`` command itself is :mod:`vseinf.cli.serve`."""

from .app import background_server, create_app

__all__ = ["background_server", "create_app"]
