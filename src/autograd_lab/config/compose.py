"""Hydra's compose API, with one-line errors: the config exactly as `autograd-lab train` builds
it, for the CLI's checks, the Python API, the tools and the tests. Torch-free."""

from __future__ import annotations

from autograd_lab.config.keys import CONF_DIR, MISSING, get_dotted, settable_keys
from autograd_lab.errors import UserError, did_you_mean, first_line


def compose(overrides=(), config_name: str = "train", return_hydra_config: bool = False):
    """The config `autograd-lab train <overrides>` would run, composed by Hydra's compose API.

    The one compose helper: the CLI's tools, the tests, the notebooks and the scripts use it.
    Raises UserError (one line) for an unknown group, key or value."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return _compose(hydra_compose, list(overrides), return_hydra_config,
                            config_name=config_name)
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------- composing before Hydra runs
def _is_hydra_override(text: str) -> bool:
    return text.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))


def _copy_tree(d):
    """A copy of a plain config tree (dicts and lists), quicker than copy.deepcopy."""
    if isinstance(d, dict):
        return {k: _copy_tree(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy_tree(v) for v in d]
    return d


def _set_dotted(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d[part]
    d[leaf] = value


def _first_choice(override) -> str:
    if override.is_sweep_override():
        return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
    return override.input_line


def _compose(compose, overrides: list[str], return_hydra: bool, config_name: str = "train"):
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra)
    except MissingConfigException as e:
        raise UserError(_missing_group_message(e, overrides)) from None
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        raise UserError(_composition_message(e, overrides, compose)) from None


def _missing_group_message(e, overrides: list[str]) -> str:
    missing = getattr(e, "missing_cfg_file", None) or ""
    group, _, name = str(missing).rpartition("/")
    options = getattr(e, "options", None)
    if not options and group:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if group and options is not None:
        return (f"{group}={name}: no such {group}{did_you_mean(name, options)}; choices are: "
                f"{', '.join(sorted(options))}")
    return first_line(str(e))


def _composition_message(e, overrides: list[str], compose) -> str:
    text = str(e)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in text or f"'{key.split('.')[-1]}'" in text:
            parent, _, leaf = key.rpartition(".")
            rest = [o for o in overrides if o is not ov]
            try:
                cfg = compose("train", overrides=rest)
                node = get_dotted(cfg, parent) if parent else cfg
                if node is not MISSING and hasattr(node, "keys"):
                    where = f"keys in {parent}" if parent else "top-level keys and groups"
                    keys = settable_keys(node)
                    return (f"{key}: no such key{did_you_mean(leaf, keys)}; {where} "
                            f"are: {', '.join(keys)}")
            except Exception:  # the other overrides are broken too: fall back to Hydra's words
                pass
    return first_line(text)
