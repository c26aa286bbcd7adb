"""app.json's entries for the sinks' settings, made from their declarations.

``python -m workers.sinks.app_json`` writes them into app.json (the file Heroku
reads, committed): an entry already there is replaced in place, a new one is
added at the end; every other entry stays as it is. tests/test_sink_registry.py
checks that app.json holds exactly these entries.
"""
import json
import sys
from pathlib import Path

from workers.sinks import SINKS

APP_JSON = Path(__file__).resolve().parents[2] / "app.json"


def env_entry(setting):
    """app.json's entry for one ``SinkSetting``: its description, its default as ``value``, not required."""
    entry = {"description": setting.description}
    default = setting.field.load_default
    if default not in (None, ()):
        entry["value"] = (",".join(map(str, default)) if isinstance(default, tuple)
                          else json.dumps(default) if isinstance(default, bool) else str(default))
    entry["required"] = False
    return entry


def sink_env_entries():
    """``{variable: entry}`` for every setting of every registered sink."""
    return {setting.env: env_entry(setting) for sink in SINKS.values() for setting in sink.settings}


def main(path=APP_JSON):
    app = json.loads(path.read_text(encoding="utf-8"))
    app["env"].update(sink_env_entries())
    path.write_text(json.dumps(app, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote the sinks' settings into {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
