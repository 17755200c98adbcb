#!/usr/bin/env python3
"""Renders the official Mixtral, Qwen3.5 and gpt-oss chat templates with transformers' own machinery.

Reads tests/data/chat_templates/conversations.json (the templates, their special tokens and the
conversations) and writes tests/data/chat_templates/<name>.renderings.json: for each case the
conversation, the arguments and either the text transformers renders or the error it raises.
tests/chat_template_test.cpp renders the same cases with our Jinja engine and compares.

Nothing is downloaded: the template texts are read from tests/data and rendered through
transformers.utils.chat_template_utils.render_jinja_template, the function that
PreTrainedTokenizerBase.apply_chat_template calls (same sandboxed jinja2 environment,
trim_blocks/lstrip_blocks, raise_exception, tojson, strftime_now). Its keyword arguments are the
ones apply_chat_template passes: the tokenizer's special tokens (bos_token, eos_token, ...) and
then the caller's extra kwargs (enable_thinking, add_vision_id, ...), with tools/documents named.

A template with "fixed_date" in conversations.json (gpt-oss: its system message prints
strftime_now("%Y-%m-%d")) is rendered with strftime_now pinned to that day; the rendering records
it, and the C++ test compares with the date its own strftime_now gives put in its place.

Usage: python3 tools/refs/render_chat_templates.py [DATA_DIR [OUT_DIR]]
  DATA_DIR defaults to tests/data, OUT_DIR to DATA_DIR/chat_templates.
"""
import datetime
import json
import os
import sys

import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template


def load_template(path):
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    with open(path, encoding="utf-8") as f:
        return f.read()


def fixed_strftime_now(date):
    """strftime_now pinned to one day (gpt-oss's template prints "Current date: ..."): passed as a
    render variable, it shadows the environment's global of the same name, as any variable does."""
    day = datetime.datetime.strptime(date, "%Y-%m-%d")
    return lambda fmt: day.strftime(fmt)


def render_case(template, special_tokens, case, fixed_date=None):
    kwargs = dict(case.get("kwargs", {}))
    tools = kwargs.pop("tools", None)
    documents = kwargs.pop("documents", None)
    template_kwargs = {**special_tokens, **kwargs}
    if fixed_date:
        template_kwargs["strftime_now"] = fixed_strftime_now(fixed_date)
    out = {
        "name": case["name"],
        "messages": case["messages"],
        "add_generation_prompt": case["add_generation_prompt"],
        "kwargs": case.get("kwargs", {}),
    }
    try:
        rendered, _ = render_jinja_template(
            conversations=[case["messages"]],
            tools=tools,
            documents=documents,
            chat_template=template,
            return_assistant_tokens_mask=False,
            continue_final_message=False,
            add_generation_prompt=case["add_generation_prompt"],
            **template_kwargs,
        )
        out["text"] = rendered[0]
    except jinja2.exceptions.TemplateError as e:  # raise_exception() raises TemplateError
        out["error"] = {"type": type(e).__name__, "message": str(e)}
    return out


def main():
    data_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(data_dir, "chat_templates")
    with open(os.path.join(data_dir, "chat_templates", "conversations.json"), encoding="utf-8") as f:
        spec = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    for t in spec["templates"]:
        template = load_template(os.path.join(data_dir, t["template"]))
        fixed_date = t.get("fixed_date")
        results = [render_case(template, t["special_tokens"], c, fixed_date) for c in t["cases"]]
        if fixed_date:  # the pinned date must have reached every rendering
            assert all(fixed_date in r["text"] for r in results if "text" in r), t["name"]
        doc = {
            "template": t["template"],
            "special_tokens": t["special_tokens"],
            "rendered_by": "transformers %s (render_jinja_template), jinja2 %s"
            % (transformers.__version__, jinja2.__version__),
            "cases": results,
        }
        if fixed_date:
            doc["fixed_date"] = fixed_date

        path = os.path.join(out_dir, t["name"] + ".renderings.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        n_err = sum("error" in r for r in results)
        print("%s: %d cases (%d raise) -> %s" % (t["name"], len(results), n_err, path))


if __name__ == "__main__":
    main()
