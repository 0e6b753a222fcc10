"""Generate the committed protobuf code in fedsqueeze/protos/ from the .proto sources in protos/.

    python -m fedsqueeze.wire.protogen generate   # rewrite fedsqueeze/protos/ from protos/
    python -m fedsqueeze.wire.protogen check      # fail if the committed code is out of date

Both run grpc_tools.protoc (a dev dependency) from the current interpreter, so the result only
depends on the grpcio-tools version installed. The .proto files import nothing but each other
by their path under protos/; the generated modules get their package-qualified names by a
deterministic textual rewrite, and `generate` writes the package `__init__.py` files, so that
`from fedsqueeze.protos.fedsqueeze.v1 import payload_pb2` works.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # fedsqueeze/
REPO_ROOT = PACKAGE_DIR.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUT_ROOT = PACKAGE_DIR / "protos"
PACKAGE_PREFIX = "fedsqueeze.protos."
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")
INIT_TEXT = '"""Code generated from protos/ by `python -m fedsqueeze.wire.protogen generate`."""\n'


class ProtogenError(RuntimeError):
    """protoc failed, or the committed generated code differs from a fresh generation."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources, as paths relative to proto_root, in a fixed order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def run_protoc(out_dir: Path, proto_root: Path = PROTO_ROOT) -> None:
    """Compile every .proto under proto_root into Python modules (and stubs) under out_dir."""
    files = proto_files(proto_root)
    if not files:
        raise ProtogenError(f"no .proto files under {proto_root}")
    try:
        import grpc_tools
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ProtogenError("grpcio-tools is not installed: pip install -e '.[dev]'") from e
    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(f) for f in files),
    ]
    done = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True)
    if done.returncode != 0:
        raise ProtogenError(f"protoc failed ({done.returncode}):\n{done.stderr.strip()}")
    _fix_module_names(out_dir)


def _fix_module_names(out_dir: Path) -> None:
    """Make the generated modules name themselves (and each other) by their place in the package.

    protoc names a module after the .proto path (`fedsqueeze.v1.payload_pb2`); inside this
    package it is `fedsqueeze.protos.fedsqueeze.v1.payload_pb2`. The rewrite is textual and
    deterministic: imports of sibling generated modules and the module name given to the builder.
    """
    modules = {p.relative_to(out_dir).with_suffix("").as_posix().replace("/", ".") for p in out_dir.rglob("*_pb2.py")}
    for path in sorted(out_dir.rglob("*_pb2.py*")):
        text = path.read_text()
        for name in sorted(modules):
            package, _, leaf = name.rpartition(".")
            text = re.sub(
                rf"^from {re.escape(package)} import {leaf}\b",
                f"from {PACKAGE_PREFIX}{package} import {leaf}",
                text,
                flags=re.MULTILINE,
            )
            builder_arg = f"(DESCRIPTOR, '{name}', _globals)"
            text = text.replace(builder_arg, builder_arg.replace(f"'{name}'", f"'{PACKAGE_PREFIX}{name}'"))
        path.write_text(text)


def _generated(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def _write_inits(out_root: Path) -> None:
    """An __init__.py in out_root and every folder below it that holds generated code."""
    folders = {out_root}
    for name in _generated(out_root):
        parent = (out_root / name).parent
        while parent != out_root:
            folders.add(parent)
            parent = parent.parent
    for folder in sorted(folders):
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text(INIT_TEXT)


def generate(out_root: Path = OUT_ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Regenerate out_root from proto_root; stale generated modules are removed."""
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp), proto_root)
        fresh = _generated(Path(tmp))
    for name in _generated(out_root) if out_root.exists() else {}:
        if name not in fresh:
            (out_root / name).unlink()
    for name, content in fresh.items():
        path = out_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
    _write_inits(out_root)
    return sorted(fresh)


def check(out_root: Path = OUT_ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """The differences between the committed generated code and a fresh generation (empty: none)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp), proto_root)
        fresh = _generated(Path(tmp))
    committed = _generated(out_root) if out_root.exists() else {}
    shown = out_root.relative_to(REPO_ROOT) if out_root.is_relative_to(REPO_ROOT) else out_root
    problems = []
    for name in sorted(set(fresh) | set(committed)):
        if name not in committed:
            problems.append(f"missing: {shown}/{name}")
        elif name not in fresh:
            problems.append(f"stale (no .proto source): {shown}/{name}")
        elif committed[name] != fresh[name]:
            diff = difflib.unified_diff(
                committed[name].decode(errors="replace").splitlines(),
                fresh[name].decode(errors="replace").splitlines(),
                "committed",
                "generated",
                lineterm="",
                n=1,
            )
            lines = [line if len(line) <= 160 else line[:157] + "..." for line in list(diff)[:20]]
            problems.append(f"differs: {shown}/{name}\n" + "\n".join(lines))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsqueeze.wire.protogen", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("generate", "check"))
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            names = generate()
            print(f"generated {len(names)} files into {OUT_ROOT.relative_to(REPO_ROOT)}/: {', '.join(names)}")
            return 0
        problems = check()
    except ProtogenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        print(
            f"error: {OUT_ROOT.relative_to(REPO_ROOT)}/ is out of date with protos/ "
            "(run `make protos` and commit the result):\n" + "\n".join(problems),
            file=sys.stderr,
        )
        return 1
    print(f"{OUT_ROOT.relative_to(REPO_ROOT)}/ is up to date with protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
