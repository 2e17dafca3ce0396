"""`vseinf serve INDEX`: the web page and JSON API over an index (the app: :mod:`vseinf.serve.app`)."""

from __future__ import annotations

from .argtypes import port_number
from .search import add_engine_settings


def add_serve_parser(sub):
    p = sub.add_parser("serve", help="web page + JSON API to search an index",
                       description="Serve INDEX: a search page at /, the GPO coefficient plot at /gpo, "
                                   "and GET /api/search?q=TEXT&k=K.")
    p.add_argument("index", help="index directory made by `vseinf encode` (or `vseinf demo`)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--model", help="checkpoint directory (default: the model that built the index)")
    p.add_argument("--device", default="cpu", help="where the model and the exact engine run (cpu, cuda, cuda:1…)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this host name (repeatable; '.example.org' for its "
                        "subdomains, '*' for any). By default only localhost and the --host address are "
                        "answered, so other web sites cannot read the index through DNS rebinding")
    p.add_argument("--api-docs", action="store_true", help="serve the OpenAPI schema (/openapi.json) and "
                                                           "its page (/docs, which loads scripts from a CDN)")
    add_engine_settings(p)
    return p


def run_serve(args, extra) -> int:
    try:  # the web extras are optional
        import fastapi  # noqa: F401
        import uvicorn

        from ..search.engines import engine_settings, tune_engine
        from ..search.gallery import Gallery
        from ..serve.app import create_app
        from ..serve.security import HostPolicy
    except ImportError:
        raise ValueError("serve needs the web extras: pip install 'vseinf[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    HostPolicy(args.host, args.allow_host)  # a bad --allow-host fails before the index loads
    gallery = Gallery.load(args.index, device=args.device)
    tune_engine(gallery.engine, **engine_settings(args))  # a wrong setting fails before the model loads
    app = create_app(gallery=gallery, model_path=args.model, device=args.device, host=args.host,
                     allow_hosts=args.allow_host, api_docs=args.api_docs)
    print(f"serving {len(gallery)} {gallery.kind} from {gallery.path} at http://{args.host}:{args.port}/ "
          "(Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
