"""`ember show NAME|PATH`: what a model is: architecture, size, context, quantization, template, license, files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    parser = sub.add_parser("show", help="describe a model",
                            description="Show a model's architecture, parameters, context, quantization, chat "
                                        "template, license and files.")
    parser.add_argument("model", metavar="NAME|PATH", help="a store or discovered name, HF repo id, or a path")
    parser.add_argument("--template", action="store_true", help="print the whole chat template")
    parser.add_argument("--json", action="store_true", help="print JSON")


def describe(ref: str) -> dict:
    from ember.store.discovery import discover_all
    from ember.store.info import describe_path
    from ember.store.model_info import describe_model
    from ember.store.resolve import resolve
    from ember.store.store import ModelStore

    resolved = resolve(ref, allow_paths=True)
    details = describe_path(resolved.path)
    model = describe_model(resolved.name, resolved.path, resolved.format)
    info = {"name": resolved.name, "path": str(resolved.path), "format": resolved.format,
            "source": resolved.source, **details, "family": model.family, "digest": f"sha256:{model.digest}",
            "embedding_length": model.embedding_length, "capabilities": list(model.capabilities),
            "defaults": model.defaults}
    if resolved.source == "ollama" and not info.get("template"):
        match = [m for m in discover_all() if m.name == resolved.name]
        if match and match[0].template:
            info["template"] = match[0].template
            info["template_format"] = "go (ollama)"
    files: list[dict] = []
    if resolved.source == "store":
        manifest = ModelStore().get(resolved.name)
        files = [{"name": n, "size": f.size, "digest": f"sha256:{f.digest}"} for n, f in manifest.files.items()]
        info["origin"] = manifest.source
    else:
        path = Path(resolved.path)
        entries = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        files = [{"name": p.name, "size": p.stat().st_size} for p in entries]
    info["files"] = files
    return info


def run(args: argparse.Namespace) -> int:
    from ember.store.info import format_params, format_size

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    rows = [("name", info["name"]), ("path", info["path"]), ("format", info["format"]),
            ("source", info["source"]), ("architecture", info.get("architecture") or "-"),
            ("parameters", format_params(info.get("parameters"))),
            ("context", str(info.get("context_length") or "-")), ("quantization", info.get("quant") or "-"),
            ("license", info.get("license") or "-"), ("digest", info["digest"]),
            ("capabilities", ", ".join(info["capabilities"]))]
    if info["defaults"]:
        rows.append(("defaults", ", ".join(f"{k} {v}" for k, v in info["defaults"].items())))
    origin = info.get("origin") or {}
    if origin.get("repo"):
        rows.append(("origin", f"hf.co/{origin['repo']}" + (f"@{origin['revision'][:12]}" if origin.get("revision")
                                                             else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    template = info.get("template")
    if template:
        lines = template.splitlines()
        shown = lines if args.template else lines[:6]
        kind = f" ({info['template_format']})" if info.get("template_format") else ""
        print(f"\ntemplate{kind}:")
        for line in shown:
            print(f"  {line}")
        if len(shown) < len(lines):
            print(f"  ... ({len(lines) - len(shown)} more lines; --template shows all)")
    else:
        print("\ntemplate: none")
    print("\nfiles:")
    for f in info["files"]:
        print(f"  {f['name']:<40} {format_size(f['size']):>10}")
    return 0
