//! Tools in chat templates: what a template sees of tool calls and results, and
//! the generic rendering for templates that know no tools.
//!
//! Hugging Face templates that support tools (Qwen2.5, Llama 3.1/3.2, Mistral,
//! Hermes) read `tools` (OpenAI's list of `{"type": "function", "function":
//! {...}}`), `message.tool_calls` (with `function.arguments` as an object: the
//! templates apply `tojson` to it) and `message.tool_call_id`. The generic
//! rendering is for a template without any of that (SmolLM2's ChatML): the
//! tool list and instructions go into the system prompt, the assistant's calls
//! are written in its text in the Hermes format (`<tool_call>{…}</tool_call>`,
//! the format then parsed from the output), and tool results become user turns
//! wrapped in `<tool_response>`. All of it is PHI (descriptions, arguments,
//! results).

use serde::Serialize;
use serde_json::Value as Json;

use super::{ChatMessage, Role};
use crate::tool_calls::ToolCallFormat;
use crate::Phi;

/// A call an assistant message of the history made. `arguments` is the JSON
/// text of the arguments (PHI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Phi<String>,
}

/// The tools a request offers, in OpenAI's shape (`{"type": "function",
/// "function": {"name", "description", "parameters"}}`). Client data: `Debug`
/// shows only how many.
#[derive(Clone, Default, PartialEq)]
pub struct ToolDefinitions(pub Vec<Json>);

impl ToolDefinitions {
    pub fn expose(&self) -> &[Json] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for ToolDefinitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ToolDefinitions([PHI; {} tools])", self.0.len())
    }
}

#[derive(Serialize)]
struct TemplateFunction<'a> {
    name: &'a str,
    arguments: Json,
}

#[derive(Serialize)]
struct TemplateCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: TemplateFunction<'a>,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<TemplateCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

/// A call's arguments as templates expect them: the parsed object (their
/// `tojson` writes it back), or the text when it is not JSON.
fn arguments_value(arguments: &Phi<String>) -> Json {
    serde_json::from_str(arguments.expose()).unwrap_or_else(|_| Json::String(arguments.expose().clone()))
}

/// How a template expects call ids: as given, or (Mistral's templates, which
/// refuse any other length) as their last nine characters, as vLLM passes
/// them. Ids are ours (`call_` and hex) or the client's; never PHI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallIds {
    AsGiven,
    LastNine,
}

impl CallIds {
    fn apply(self, id: &str) -> &str {
        match self {
            CallIds::LastNine if id.chars().count() > 9 => {
                let cut = id.char_indices().rev().nth(8).map_or(0, |(i, _)| i);
                &id[cut..]
            }
            _ => id,
        }
    }
}

/// One message as a template sees it.
pub(super) fn template_message(m: &ChatMessage, ids: CallIds) -> minijinja::Value {
    let msg = TemplateMessage {
        role: m.role.as_str(),
        content: m.content.expose(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| TemplateCall {
                id: ids.apply(&c.id),
                kind: "function",
                function: TemplateFunction { name: &c.name, arguments: arguments_value(&c.arguments) },
            })
            .collect(),
        tool_call_id: m.tool_call_id.as_deref().map(|id| ids.apply(id)),
    };
    minijinja::Value::from_serialize(&msg)
}

/// The system-prompt text of the generic rendering: the tools and how to call them.
pub fn generic_tools_prompt(tools: &ToolDefinitions) -> String {
    let mut s = String::from(
        "You can call functions to help answer. The functions are described in JSON Schema inside <tools></tools>:\n<tools>\n",
    );
    for t in tools.expose() {
        let f = t.get("function").unwrap_or(t);
        s.push_str(&crate::tool_calls::python_style_json(f));
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, answer with one <tool_call></tool_call> block per call, each holding a JSON object with the function's name and its arguments:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>\nOtherwise, answer normally.",
    );
    s
}

/// The messages of the generic rendering: the tool list added to the system
/// prompt (or a new one), calls written into the assistant's text, tool
/// results as user turns.
pub(super) fn generic_messages(messages: &[ChatMessage], tools: &ToolDefinitions) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let prompt = generic_tools_prompt(tools);
        match messages.first() {
            Some(first) if first.role == Role::System => {
                let mut m = first.clone();
                m.content = Phi::new(format!("{}\n\n{prompt}", first.content.expose()));
                out.push(m);
            }
            _ => out.push(ChatMessage::new(Role::System, prompt)),
        }
    }
    let skip = usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == Role::System));
    for m in &messages[skip..] {
        out.push(match m.role {
            Role::Assistant if !m.tool_calls.is_empty() => {
                let args: Vec<Json> = m.tool_calls.iter().map(|c| arguments_value(&c.arguments)).collect();
                let calls: Vec<(&str, &Json)> = m.tool_calls.iter().map(|c| c.name.as_str()).zip(args.iter()).collect();
                let rendered = ToolCallFormat::Hermes.render_calls(&calls);
                let content = if m.content.expose().is_empty() {
                    rendered
                } else {
                    format!("{}\n{rendered}", m.content.expose())
                };
                ChatMessage::new(Role::Assistant, content)
            }
            Role::Tool => {
                ChatMessage::new(Role::User, format!("<tool_response>\n{}\n</tool_response>", m.content.expose()))
            }
            _ => m.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatTemplate, RenderOptions};

    fn conversation() -> (Vec<ChatMessage>, ToolDefinitions) {
        let tools = ToolDefinitions(vec![serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather <now>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})]);
        let mut call = ChatMessage::new(Role::Assistant, "");
        call.tool_calls = vec![HistoryToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: Phi::new(r#"{"city":"Paris"}"#.into()),
        }];
        let mut result = ChatMessage::new(Role::Tool, r#"{"temp_c": 21}"#);
        result.tool_call_id = Some("call_1".into());
        (vec![ChatMessage::new(Role::User, "Weather in Paris?"), call, result], tools)
    }

    /// Qwen2.5's own template (its tool parts, verbatim from the model's
    /// tokenizer_config.json) renders exactly what `apply_chat_template` does:
    /// the golden file is its output for this conversation.
    #[test]
    fn qwen2_5_template_renders_tools_calls_and_results_like_hugging_face() {
        let t = ChatTemplate::new(include_str!("qwen2_5_tools.jinja"), None, None).unwrap();
        assert!(t.knows_tools());
        assert_eq!(t.tool_format(), Some(ToolCallFormat::Hermes));
        let (messages, tools) = conversation();
        let out = t.render_with(&messages, &RenderOptions { tools, ..RenderOptions::default() }).unwrap();
        assert_eq!(out.expose().as_str(), include_str!("qwen2_5_tools.golden"));
    }

    /// The golden files of these reference templates are what Hugging Face's
    /// own renderer makes of them (`scripts/chat-template-goldens.py`).
    fn renders_like_hugging_face(
        template: &str,
        golden: &str,
        call_id: &str,
        opts: RenderOptions,
        bos_eos: (&str, &str),
    ) {
        let t = ChatTemplate::new(template, Some(bos_eos.0.into()), Some(bos_eos.1.into())).unwrap();
        assert!(t.knows_tools());
        let (mut messages, tools) = conversation();
        messages[1].tool_calls[0].id = call_id.into();
        messages[2].tool_call_id = Some(call_id.into());
        let out = t.render_with(&messages, &RenderOptions { tools, ..opts }).unwrap();
        assert_eq!(out.expose().as_str(), golden);
    }

    #[test]
    fn llama3_2_template_renders_tools_calls_and_results_like_hugging_face() {
        let t = ChatTemplate::new(include_str!("llama3_2_tools.jinja"), None, None).unwrap();
        assert_eq!(t.tool_format(), Some(ToolCallFormat::Llama3Json));
        let kwargs = crate::chat::TemplateKwargs([("date_string".to_string(), "26 Jul 2024".into())].into());
        renders_like_hugging_face(
            include_str!("llama3_2_tools.jinja"),
            include_str!("llama3_2_tools.golden"),
            "call_1",
            RenderOptions { kwargs, ..RenderOptions::default() },
            ("<|begin_of_text|>", "<|eot_id|>"),
        );
    }

    #[test]
    fn mistral_template_renders_tools_calls_and_results_like_hugging_face() {
        let t = ChatTemplate::new(include_str!("mistral_nemo_tools.jinja"), None, None).unwrap();
        assert_eq!(t.tool_format(), Some(ToolCallFormat::Mistral));
        let opts = RenderOptions { add_generation_prompt: false, ..RenderOptions::default() };
        let golden = include_str!("mistral_nemo_tools.golden");
        renders_like_hugging_face(
            include_str!("mistral_nemo_tools.jinja"),
            golden,
            "a1B2c3D4e",
            opts.clone(),
            ("<s>", "</s>"),
        );
        // Our own ids (`call_` and 24 hex digits), which Mistral's templates
        // refuse, reach them as their last nine characters.
        renders_like_hugging_face(
            include_str!("mistral_nemo_tools.jinja"),
            golden,
            "call_0123456789abcdefa1B2c3D4e",
            opts,
            ("<s>", "</s>"),
        );
    }

    /// A template without tools (ChatML, as SmolLM2's) gets the generic
    /// rendering: the tools in the system prompt, the call in Hermes form,
    /// the result as a user turn.
    #[test]
    fn a_template_without_tools_gets_the_generic_rendering() {
        let chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(chatml, None, None).unwrap();
        assert!(!t.knows_tools());
        assert_eq!(t.tool_format(), Some(ToolCallFormat::Hermes));
        let (messages, tools) = conversation();
        let out = t.render_with(&messages, &RenderOptions { tools, ..RenderOptions::default() }).unwrap();
        let out = out.expose();
        assert!(out.starts_with("<|im_start|>system\nYou can call functions"), "{out}");
        assert!(out.contains("\"name\": \"get_weather\", \"description\": \"Weather <now>\""), "{out}");
        assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>"), "{out}");
        assert!(
            out.contains("<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response><|im_end|>"),
            "{out}"
        );
        // Without tools offered (tool_choice none) the history still renders.
        let out = t.render_with(&messages, &RenderOptions::default()).unwrap();
        assert!(!out.expose().contains("You can call functions") && out.expose().contains("<tool_response>"));
    }
}
