"""`gopc check-cluster FILE`: Ray's offline check of a launcher YAML, its reason in one line naming the field."""
from __future__ import annotations

from gopc.config import load_yaml
from gopc.errors import GopcError


def check_cluster_file(path: str) -> dict:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # Ray's validator; no public API

    raw = load_yaml(path, field="cluster file")
    if not isinstance(raw, dict):
        raise GopcError(f"cluster file: {path} must be a mapping (cluster_name, provider, ...)")
    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise GopcError(f"{path}: {where}: {e.message} (Ray's validator); fix that field") from None
    except (ValueError, KeyError) as e:
        raise GopcError(f"{path}: {e} (Ray's validator)") from None
    return prepared
