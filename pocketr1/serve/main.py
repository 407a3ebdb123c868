"""`pocketr1 serve PATH`: load a model folder, start the engine thread, and serve HTTP until Ctrl-C."""

from __future__ import annotations

import socket
import sys

from pocketr1.errors import UserError


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    return sock


def serve_command(args) -> None:
    import torch
    import uvicorn

    from pocketr1.chat import resolve_model_dir
    from pocketr1.engine.batcher import Batcher
    from pocketr1.model import load_model
    from pocketr1.serve.api import create_app
    from pocketr1.tokenizer import ChatTokenizer
    from pocketr1.train.common import pick_device

    if not 1 <= args.max_batch <= 1024:
        raise UserError("--max-batch must be between 1 and 1024.")
    if not 0 <= args.queue <= 100_000:
        raise UserError("--queue must be between 0 and 100000.")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty.")
    if not args.keepalive > 0:
        raise UserError("--keepalive must be a positive number of seconds.")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be between 0 and 65535.")
    folder = resolve_model_dir(args.path)
    tok = ChatTokenizer(folder)
    model = load_model(folder, device=pick_device(args.device), dtype=torch.float32,
                       int8=getattr(args, "int8", False))
    engine = Batcher(model, tok, max_batch=args.max_batch, max_queue=args.queue, dtype=getattr(torch, args.dtype))
    model_id = folder.resolve().name
    app = create_app(engine, tok, model_id, api_key=args.api_key, keepalive_s=args.keepalive)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            # Printed once the socket accepts connections: scripts may wait for this line.
            print(f"pocketr1 serve: {model_id} at {url}  (chat page {url}/, API {url}/v1)", flush=True)

    # h11 named (not "auto"), so the limits below hold whichever parser packages are installed: headers
    # still arriving are cut off at 16 KiB (the app caps complete ones), an idle kept-alive connection at 5 s.
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, http="h11",
                            h11_max_incomplete_event_size=16 << 10, timeout_keep_alive=5)
    try:
        Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    print("pocketr1 serve: stopped.", file=sys.stderr)
