"""Model answers taken apart in their chat template's format: ``reasoning_content`` apart from the
answer, tool calls parsed back into OpenAI's ``tool_calls``, whole and streamed.

Which format a template uses is ``cluster.engine.chat_format.detect_format``; here are the parsers:

* ``events``: what they yield (text, ``Reasoning``, ``ParsedCall``) and shared text helpers;
* ``reasoning``: a ``<think>...</think>`` thought at the start of an answer (or one the prompt opened);
* ``blocks``: the stream machine of answer text with call blocks;
* ``syntaxes``: each family's call format (Hermes/Qwen, Qwen3-Coder XML, GLM-4.5, DeepSeek, Kimi K2,
  Mistral, Llama 3.x JSON);
* ``harmony``: gpt-oss's channels (analysis as reasoning, final, calls to ``functions.*``);
* ``answer``: all of it stacked for one answer (``AnswerStream``, ``parse_answer``).
"""

from cluster.api.formats.answer import AnswerStream, ParsedAnswer, collect, parse_answer
from cluster.api.formats.events import Event, ParsedCall, Reasoning

__all__ = ["AnswerStream", "Event", "ParsedAnswer", "ParsedCall", "Reasoning", "collect", "parse_answer"]
