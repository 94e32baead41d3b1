"""The committed gRPC stubs are exactly what `make protos` generates from kvfleet.proto."""

from __future__ import annotations

from pathlib import Path

from kvfleet.dataplane.rpc import codegen


def test_stubs_match_the_proto(tmp_path: Path):
    for fresh in codegen.generate(tmp_path):
        committed = codegen.HERE / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed.name} drifted: run `make protos`"
