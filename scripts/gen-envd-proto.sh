#!/usr/bin/env bash
# Regenerates src/cove/compat/e2b/proto/*_pb2.py from the .proto files beside them.
# protoc comes from grpcio-tools 1.63 (protobuf 5.26 gencode), so the modules load on any
# protobuf runtime >= 5.26 (pyproject's floor); it is installed in a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GEN_VENV:-/tmp/cove-gen-proto}"
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "grpcio-tools==1.63.2"; }
out=src/cove/compat/e2b/proto
"$venv/bin/python" -m grpc_tools.protoc -I "$out" --python_out="$out" \
  "$out/process.proto" "$out/filesystem.proto"
# Generated code keeps protoc's layout: ruff neither lints nor formats it.
for f in "$out"/process_pb2.py "$out"/filesystem_pb2.py; do
  { printf '# ruff: noqa\n# fmt: off\n'; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
