"""`gopc check-cluster FILE`: Ray's own offline validation of a cluster launcher YAML, with its
reason turned into one line that names the field."""
from __future__ import annotations

import yaml

from gopc.errors import GopcError


def check_cluster_file(path: str) -> dict:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # Ray's validator; no public API

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise GopcError(f"cluster file: {path} not found") from None
    except yaml.YAMLError as e:
        raise GopcError(f"cluster file: {path} is not valid YAML: {getattr(e, 'problem', e)}") from None
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
