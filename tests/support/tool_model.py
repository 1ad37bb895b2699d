"""A copy of the tiny model whose chat template speaks tools (mlx-lm then picks its json_tools parser)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Hermes/Qwen-style: tools in the system turn, calls as JSON inside <tool_call> tags.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n{% endif %}'
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] %}{% set tool_call = call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "<|im_start|>tool\n<tool_response>{{ message['content'] }}</tool_response><|im_end|>\n"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def write_tool_model(source: Path, target: Path) -> Path:
    """Copy the model folder at `source` to `target` with the tool-speaking chat template."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return target
