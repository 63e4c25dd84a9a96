"""Chat templates render to exactly the text of transformers' apply_chat_template, and tokenize alike."""

import json

import jinja2
import pytest

from minigpt.tokenizers.chat_template import load_chat_template, render_chat
from minigpt.tokenizers.tokenizer_json import load_hf_tokenizer

transformers = pytest.importorskip("transformers", reason="the reference chat templates run in transformers")
from tokenizers import AddedToken, Tokenizer, decoders, models  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402

# The templates as the real tokenizer_config.json files have them (tool-call branches trimmed)
CHATML_QWEN = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHATML_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + \
'<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Mistral-style: the template itself refuses roles out of order
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml-qwen": CHATML_QWEN, "chatml-smollm2": CHATML_SMOLLM2, "llama3": LLAMA3, "llama3.2": LLAMA32}
SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
           "<|im_end|>", "<|endoftext|>"]

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hi there! Ça va? 😀"}],
    "with system": [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": "What is 2+2?"}],
    "multi turn": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "  Another one, please  "}],
    "system and turns": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": "Arr!", "tool_calls": None},
                         {"role": "user", "content": "<b>bold</b> & 'quoted'"}],
}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville <now>",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def model_directory(directory, template, template_file=False):
    """A tokenizer directory as the hub has them: tokenizer.json, tokenizer_config.json with the template."""
    byte_vocab = {char: i for i, char in enumerate(sorted(pt.ByteLevel.alphabet()))}  # the 256 bytes, no merges
    tokenizer = Tokenizer(models.BPE(byte_vocab, [], ignore_merges=True))
    tokenizer.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"}, "pad_token": "<|endoftext|>"}
    if template_file:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
        config["chat_template"] = "{{ 'the file comes first' }}"
    else:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module", params=list(TEMPLATES))
def model(request, tmp_path_factory):
    """(transformers' tokenizer, our tokenizer, our template) read from the same directory."""
    directory = model_directory(tmp_path_factory.mktemp("model"), TEMPLATES[request.param])
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    return reference, load_hf_tokenizer(directory), load_chat_template(directory)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_rendering_equals_transformers(model, conversation, add_generation_prompt):
    reference, ours, template = model
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             date_string="29 Nov 2026")
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt, date_string="29 Nov 2026",
                       **ours.special_token_names)
    assert text == expected
    # ... and the ids of the text (special tokens read as such) equal those transformers gives
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        date_string="29 Nov 2026", return_dict=False)
    assert ours.encode(text, allowed_special="all") == list(ids)


def test_tools_are_written_as_json_without_html_escapes(model):
    reference, ours, template = model
    messages = CONVERSATIONS["with system"]
    text = render_chat(template, messages, tools=[TOOL], date_string="1 Jan 2025", **ours.special_token_names)
    assert text == reference.apply_chat_template(messages, tools=[TOOL], tokenize=False, add_generation_prompt=True,
                                                 date_string="1 Jan 2025")


def test_today_s_date_comes_from_strftime_now(tmp_path):
    directory = model_directory(tmp_path, LLAMA32)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    messages = CONVERSATIONS["user only"]
    text = render_chat(load_chat_template(directory), messages, bos_token="<|begin_of_text|>")
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_the_template_file_comes_before_the_config(tmp_path):
    directory = model_directory(tmp_path, CHATML_SMOLLM2, template_file=True)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    assert load_chat_template(directory) == CHATML_SMOLLM2 == reference.chat_template


def test_named_templates_and_none(tmp_path):
    assert load_chat_template(tmp_path) is None
    config = {"chat_template": [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": LLAMA32}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert load_chat_template(tmp_path) == LLAMA3
    assert load_chat_template(tmp_path, "tool_use") == LLAMA32
    with pytest.raises(ValueError, match="no chat template named 'rag'.*'default', 'tool_use'"):
        load_chat_template(tmp_path, "rag")


def test_a_template_refusing_the_conversation_raises_its_message(tmp_path):
    directory = model_directory(tmp_path, ALTERNATING)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    good = CONVERSATIONS["multi turn"]
    assert render_chat(ALTERNATING, good, bos_token="<s>", eos_token="</s>") == \
        reference.apply_chat_template(good, tokenize=False, bos_token="<s>", eos_token="</s>")
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate") as ours:
        render_chat(ALTERNATING, bad, bos_token="<s>", eos_token="</s>")
    with pytest.raises(jinja2.TemplateError) as theirs:
        reference.apply_chat_template(bad, tokenize=False)
    assert str(ours.value) == str(theirs.value)


def test_templates_run_sandboxed():
    # A template reaching for Python internals is stopped, as in transformers
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(escape, CONVERSATIONS["user only"])
    with pytest.raises(jinja2.exceptions.SecurityError):  # the immutable sandbox: no changing the messages
        render_chat("{{ messages.append({'role': 'user'}) }}", CONVERSATIONS["user only"])
    with pytest.raises(ValueError, match="no messages"):
        render_chat(LLAMA3, [])


def test_generation_blocks_and_reasoning_fields():
    template = ("{% for m in messages %}{{ m.role }}:{% if m.role == 'assistant' %}[{{ m.reasoning_content }}]"
                "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "adding"}]
    assert render_chat(template, messages) == "user:2+2?|assistant:[adding]4|"
    assert render_chat(template, messages) == transformers.utils.chat_template_utils.render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=True)[0][0]


def test_block_tags_leave_no_blank_lines_or_indents():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n  {{ m.content }}\n    {% endif %}\n"
                "{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = transformers.utils.chat_template_utils.render_jinja_template([messages], chat_template=template)[0][0]
    assert render_chat(template, messages) == expected == "  hi\n"
