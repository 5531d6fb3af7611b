"""The world's commands: ``qcap world``, ``qcap serve``, ``qcap score-captions``.

Usage::

    qcap world --out runs/world --num-samples 20000 [--seed 0] [--clean-samples 2000]
               [--eval-samples 500] [--base-url http://127.0.0.1:8765] [--noise web] [--preview]
    qcap serve runs/world [--port 8765]
    qcap score-captions --world runs/world --captions runs/world/pool.parquet
    qcap depth-floor --world runs/world          # the depth error no backbone can go below

Only light modules are imported here; the work happens in generate/server/oracle.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from base.cli import Command, UsageError, dispatch
from base.config import parse_config
from world.config import ScoreConfig, ServeConfig, WorldConfig

# Flags that do not change what a world holds: with only these, an existing world is reused.
_VIEW_FLAGS = {"--out", "--preview", "--no-preview", "--workers", "--ray-address"}


def world_main(argv: list[str], prog: str = "qcap world") -> int:
    cfg = parse_config(WorldConfig, argv, prog=prog)
    from world.generate import WORLD_FILE, generate_world
    from world.preview import write_preview

    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if (cfg.out / WORLD_FILE).exists() and given <= _VIEW_FLAGS:
        info = json.loads((cfg.out / WORLD_FILE).read_text())
        print(f"{cfg.out}: world exists ({info['counts']['splits']}); nothing to generate")
    else:
        try:
            info = generate_world(cfg)
        except ValueError as err:
            raise UsageError(str(err)) from err
        counts = info["counts"]
        print(f"world {cfg.out}: {json.dumps(counts['splits'])}")
        print(f"  pool faults: {json.dumps(counts['pool_faults'])}")
        print(f"  pool text kinds: {json.dumps(counts['pool_text_kinds'])}")
        print(f"  pool flags: {json.dumps(counts['pool_flags'])}")
        print(f"  serve it with: qcap serve {cfg.out}")
    if cfg.preview:
        path = write_preview(cfg.out)
        print(f"preview: {path}")
    return 0


def serve_main(argv: list[str], prog: str = "qcap serve") -> int:
    cfg = parse_config(ServeConfig, argv, prog=prog)
    from world.server import WorldServer, port_of

    info_path = cfg.world / "world.json"
    if not info_path.exists():
        raise UsageError(f"{info_path}: missing; make a world first with `qcap world --out {cfg.world}`")
    base_url = json.loads(info_path.read_text()).get("base_url", "http://127.0.0.1:8765")
    port = cfg.port if cfg.port is not None else port_of(base_url)
    try:
        server = WorldServer(cfg.world, host=cfg.host, port=port, stall_seconds=cfg.stall_seconds)
        server.start()
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UsageError(str(err)) from err
    print(f"serving {cfg.world} at {server.base_url} ({len(server.routes)} pool URLs); Ctrl-C stops", file=sys.stderr)
    if server.base_url != base_url:
        print(f"note: pool.parquet's URLs use {base_url}; rewrite them to {server.base_url}", file=sys.stderr)
    server.serve_forever()
    return 0


def score_main(argv: list[str], prog: str = "qcap score-captions") -> int:
    cfg = parse_config(ScoreConfig, argv, prog=prog)
    from world.oracle import run_scoring

    run_scoring(cfg)
    return 0


COMMANDS: dict[str, Command] = {
    "world": Command("generate the embedded DataComp-style world (pool, truth, clean and eval sets)", "world.cli:world_main"),
    "serve": Command("serve a world's pool over loopback HTTP, planted faults included", "world.cli:serve_main"),
    "score-captions": Command("score captions against a world's truth (objects, attributes, hallucinations)", "world.cli:score_main"),
    "depth-floor": Command("how well any model can predict a world's depth from its images (the floor, position-only, constant)", "world.floor:main"),
    "control-rung": Command("positive-control rung from a world's truth: a rung's images with true descriptions (oracle), or clean captions", "world.controls:main"),
}

DESCRIPTION = "world: the embedded DataComp-style world (pool, truth, clean and eval sets), its server and caption scoring."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m world", COMMANDS, argv, DESCRIPTION)
