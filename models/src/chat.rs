//! Chat templates: turning a list of chat messages into the prompt text a model
//! was trained on, with the model's own Jinja template.
//!
//! The template comes from (first match wins) the configuration (an operator
//! override), the model's `tokenizer_config.json` (`chat_template`: a string, or
//! a list of named templates of which "default" is used), or the GGUF metadata
//! key `tokenizer.chat_template`. A model without one, and no override, is an
//! error rather than a silent guess: a wrong prompt format degrades answers in
//! ways nobody notices.
//!
//! Templates are rendered with minijinja configured like Hugging Face's
//! `apply_chat_template` (`trim_blocks`, `lstrip_blocks`, Python string methods
//! through minijinja-contrib's pycompat, `raise_exception`, `strftime_now`).
//!
//! Tool calling: templates get the request's `tools` and messages with
//! `tool_calls` and `tool_call_id`, as Hugging Face passes them. A template that
//! knows no tools (SmolLM2's ChatML) gets a generic rendering instead
//! ([`tools`]): the tool list in the system prompt and calls written in the
//! Hermes `<tool_call>` format.
//!
//! Messages are PHI. The rendered prompt is returned as [`Phi`]; render errors
//! carry only the error kind and template line, never a message's text
//! (minijinja's own error text may quote template source or values).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::{context, Environment, ErrorKind};
use serde_json::Value as Json;

use crate::{ModelError, ModelSource, Phi, Result};

pub mod tools;

pub use tools::{HistoryToolCall, ToolDefinitions};

use crate::tool_calls::ToolCallFormat;

const TEMPLATE_NAME: &str = "chat";

/// The author of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (`tool_call_id` names the call it answers).
    Tool,
}

impl Role {
    /// The name templates see (`message['role']`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "system" | "developer" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            _ => Err(ModelError::ChatTemplate("unknown message role".into())),
        }
    }
}

/// One chat message. `content` and the calls' arguments are PHI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Phi<String>,
    /// The calls an assistant message made (its `content` may then be empty).
    pub tool_calls: Vec<HistoryToolCall>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: Phi::new(content.into()), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
    /// The template renders `tools` itself (its source mentions them).
    knows_tools: bool,
    /// The template's text (for `/tokenizer_info`; not PHI).
    source: std::sync::Arc<str>,
    /// How this model writes tool calls: detected from the template, set by
    /// the configuration, or Hermes for the generic rendering.
    tool_format: Option<ToolCallFormat>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos", &self.bos).field("eos", &self.eos).finish()
    }
}

impl ChatTemplate {
    /// Compiles `template_source`; `bos`/`eos` are the texts of the model's BOS
    /// and EOS tokens (templates refer to them as `bos_token` / `eos_token`).
    pub fn new(template_source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            // The message is template-authored; it is dropped by `sanitize` anyway.
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        // Python's `json.dumps` separators, no HTML escaping (minijinja's own
        // `tojson` writes compact JSON with `<` as `\u003c`: tool lists and
        // call arguments would not read as the model was trained on).
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template_source.to_owned())
            .map_err(|e| sanitize("the chat template does not compile", &e))?;
        let knows_tools = template_source.contains("tools");
        let tool_format =
            if knows_tools { ToolCallFormat::detect(template_source) } else { Some(ToolCallFormat::Hermes) };
        Ok(ChatTemplate { env, bos, eos, knows_tools, tool_format, source: template_source.into() })
    }

    /// Sets how the model writes tool calls (the `model.tool_parser` override).
    pub fn with_tool_format(mut self, format: ToolCallFormat) -> Self {
        self.tool_format = Some(format);
        self
    }

    /// How this model writes tool calls; `None` when its template renders tools
    /// in a format Salus does not parse (tool calling is then refused).
    pub fn tool_format(&self) -> Option<ToolCallFormat> {
        self.tool_format
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders tools itself (else the generic rendering).
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// The template configured for a model: `override_template` if given, else
    /// `tokenizer_config.json`'s `chat_template`, else the GGUF's
    /// `tokenizer.chat_template`; `Ok(None)` if there is none.
    pub fn from_source(
        source: &ModelSource,
        gguf_metadata: Option<&HashMap<String, GgufValue>>,
        override_template: Option<&str>,
    ) -> Result<Option<ChatTemplate>> {
        let config: Option<Json> = match source.get("tokenizer_config.json") {
            Some(b) => Some(
                serde_json::from_slice(b.as_slice())
                    .map_err(|e| ModelError::ChatTemplate(format!("invalid tokenizer_config.json: {e}")))?,
            ),
            None => None,
        };
        let config_token = |key: &str| -> Option<String> {
            match config.as_ref()?.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let gguf_token = |key: &str| -> Option<String> {
            let md = gguf_metadata?;
            let id = match md.get(key)? {
                GgufValue::U32(v) => *v as usize,
                GgufValue::I32(v) => usize::try_from(*v).ok()?,
                GgufValue::U64(v) => usize::try_from(*v).ok()?,
                _ => return None,
            };
            match md.get("tokenizer.ggml.tokens")? {
                GgufValue::Array(a) => match a.get(id)? {
                    GgufValue::String(s) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            }
        };
        let bos = config_token("bos_token").or_else(|| gguf_token("tokenizer.ggml.bos_token_id"));
        let eos = config_token("eos_token").or_else(|| gguf_token("tokenizer.ggml.eos_token_id"));

        let from_config = config.as_ref().and_then(|c| c.get("chat_template")).and_then(|t| match t {
            Json::String(s) => Some(s.clone()),
            Json::Array(list) => {
                let named = |n: &Json| n.get("template").and_then(Json::as_str).map(str::to_owned);
                list.iter()
                    .find(|n| n.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(named)
                    .or_else(|| list.first().and_then(named))
            }
            _ => None,
        });
        let from_gguf = gguf_metadata.and_then(|md| match md.get("tokenizer.chat_template") {
            Some(GgufValue::String(s)) => Some(s.clone()),
            _ => None,
        });
        match override_template.map(str::to_owned).or(from_config).or(from_gguf) {
            Some(src) => Ok(Some(ChatTemplate::new(&src, bos, eos)?)),
            None => Ok(None),
        }
    }

    /// Like [`ChatTemplate::from_source`], but a missing template is an error.
    pub fn from_source_required(
        source: &ModelSource,
        gguf_metadata: Option<&HashMap<String, GgufValue>>,
        override_template: Option<&str>,
    ) -> Result<ChatTemplate> {
        Self::from_source(source, gguf_metadata, override_template)?.ok_or_else(no_template_error)
    }

    /// Renders the prompt for `messages`; with `add_generation_prompt` the text
    /// ends with the header of an assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Phi<String>> {
        self.render_with(messages, &RenderOptions { add_generation_prompt, ..RenderOptions::default() })
    }

    /// Renders with the request's template options (vLLM's
    /// `chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`).
    pub fn render_with(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<Phi<String>> {
        let uses_tools =
            !opts.tools.is_empty() || messages.iter().any(|m| !m.tool_calls.is_empty() || m.role == Role::Tool);
        let generic;
        let (messages, tools) = if uses_tools && !self.knows_tools {
            // The template knows no tools: the tool list goes into the system
            // prompt, calls and results into ordinary turns.
            generic = tools::generic_messages(messages, &opts.tools);
            (generic.as_slice(), None)
        } else {
            (messages, (!opts.tools.is_empty()).then(|| minijinja::Value::from_serialize(opts.tools.expose())))
        };
        let ids = match self.tool_format {
            Some(ToolCallFormat::Mistral) if self.knows_tools => tools::CallIds::LastNine,
            _ => tools::CallIds::AsGiven,
        };
        let msgs: Vec<minijinja::Value> = messages.iter().map(|m| tools::template_message(m, ids)).collect();
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| sanitize("the chat template is missing", &e))?;
        let extra = minijinja::Value::from_serialize(opts.kwargs.expose());
        let out = tmpl
            .render(context! {
                messages => msgs,
                tools => tools,
                add_generation_prompt => opts.add_generation_prompt && !opts.continue_final_message,
                bos_token => self.bos.as_deref().unwrap_or(""),
                eos_token => self.eos.as_deref().unwrap_or(""),
                ..extra
            })
            .map_err(|e| sanitize("the chat template failed to render", &e))?;
        let mut out = Phi::new(out);
        if opts.continue_final_message {
            // The final message stays open: the text ends right after its
            // content, without the template's end-of-turn.
            let last = messages.last().map(|m| m.content.expose().as_str()).unwrap_or("");
            let end = match out.expose().rfind(last) {
                Some(at) if !last.is_empty() => at + last.len(),
                _ => {
                    return Err(ModelError::ChatTemplate(
                        "continue_final_message: the final message's content is not in the rendered template".into(),
                    ))
                }
            };
            out.expose_mut().truncate(end);
        }
        Ok(out)
    }
}

/// Per-request options of [`ChatTemplate::render_with`].
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Append the assistant turn's opening (default true).
    pub add_generation_prompt: bool,
    /// Leave the final message open for the model to continue (no generation
    /// prompt, no end-of-turn after it).
    pub continue_final_message: bool,
    /// Extra template variables (`enable_thinking`, …); names are validated
    /// by the caller and never shadow `messages`, `bos_token`, `eos_token`,
    /// `add_generation_prompt` (those win). Client data: PHI.
    pub kwargs: TemplateKwargs,
    /// The tools offered (`tools` of the request, OpenAI's shape); empty: none.
    pub tools: ToolDefinitions,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            add_generation_prompt: true,
            continue_final_message: false,
            kwargs: TemplateKwargs::default(),
            tools: ToolDefinitions::default(),
        }
    }
}

/// Extra template variables from a request. Client data, so `Debug` shows
/// only how many there are.
#[derive(Clone, Default, PartialEq)]
pub struct TemplateKwargs(pub std::collections::BTreeMap<String, serde_json::Value>);

impl TemplateKwargs {
    pub fn expose(&self) -> &std::collections::BTreeMap<String, serde_json::Value> {
        &self.0
    }
}

impl std::fmt::Debug for TemplateKwargs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TemplateKwargs([PHI; {} entries])", self.0.len())
    }
}

/// The error for a model without a chat template and no configured one.
pub fn no_template_error() -> ModelError {
    ModelError::ChatTemplate("model has no chat template; set one in the config".into())
}

/// A template error reduced to what is safe to show: what failed, the error
/// kind and the line — never minijinja's detail text, which can quote values.
fn sanitize(what: &str, e: &minijinja::Error) -> ModelError {
    let kind = match e.kind() {
        ErrorKind::InvalidOperation => "invalid operation or raise_exception".to_string(),
        k => k.to_string(),
    };
    match e.line() {
        Some(line) => ModelError::ChatTemplate(format!("{what} ({kind}, template line {line})")),
        None => ModelError::ChatTemplate(format!("{what} ({kind})")),
    }
}

/// `tojson` as Hugging Face renders it (`json.dumps(value, ensure_ascii=False,
/// indent=indent)`).
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let text = match indent {
        Some(n) => {
            let pad = vec![b' '; n.min(16)];
            let mut out = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&value, &mut ser)
                .map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, "tojson"))?;
            String::from_utf8(out).unwrap_or_default()
        }
        None => crate::tool_calls::python_style_json(&value),
    };
    Ok(minijinja::Value::from_safe_string(text))
}

/// `strftime_now(format)` as Hugging Face templates use it (Llama 3.x):
/// supports `%d %m %Y %y %b %B %H %M %S %%` in UTC.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(format_utc(secs, &format))
}

fn format_utc(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightBytes;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_exactly() {
        let t = ChatTemplate::new(SMOLLM2, Some("<|im_start|>".into()), Some("<|im_end|>".into())).unwrap();
        let msgs = [
            ChatMessage::new(Role::System, "You are a clinical assistant."),
            ChatMessage::new(Role::User, "Summarize: BP 120/80 mmHg."),
        ];
        let out = t.render(&msgs, true).unwrap();
        assert_eq!(
            out.expose(),
            "<|im_start|>system\nYou are a clinical assistant.<|im_end|>\n<|im_start|>user\nSummarize: BP 120/80 mmHg.<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs[1..], false).unwrap();
        assert_eq!(
            out.expose(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nSummarize: BP 120/80 mmHg.<|im_end|>\n"
        );
    }

    #[test]
    fn hf_features_trim_blocks_pycompat_bos() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'user' %}\n[U] {{ m['content'].strip() }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let out = t.render(&[ChatMessage::new(Role::User, "  hi  ")], false).unwrap();
        assert_eq!(out.expose(), "<s>[U] hi\n");
    }

    #[test]
    fn errors_never_quote_message_text() {
        let src = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system: ' + m['content']) }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t.render(&[ChatMessage::new(Role::System, "patient Jane Roe")], true).unwrap_err().to_string();
        assert!(!err.contains("Jane"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let src = "{{ messages[0]['content'] + 5 }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t.render(&[ChatMessage::new(Role::User, "MRN 123456")], true).unwrap_err().to_string();
        assert!(!err.contains("123456"), "{err}");
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err().to_string();
        assert!(err.contains("does not compile"), "{err}");
    }

    #[test]
    fn template_sources_and_precedence() {
        let mut md = HashMap::new();
        md.insert("tokenizer.chat_template".to_string(), GgufValue::String("gguf:{{ eos_token }}".into()));
        md.insert(
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(vec![GgufValue::String("<a>".into()), GgufValue::String("<z>".into())]),
        );
        md.insert("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(1));
        let gguf_src = ModelSource::new("m.gguf");
        let render = |t: ChatTemplate| t.render(&[], false).unwrap().expose().clone();

        let t = ChatTemplate::from_source(&gguf_src, Some(&md), None).unwrap().unwrap();
        assert_eq!(render(t), "gguf:<z>");
        let t = ChatTemplate::from_source(&gguf_src, Some(&md), Some("override")).unwrap().unwrap();
        assert_eq!(render(t), "override");

        let mut hf = ModelSource::new("dir");
        let cfg = br#"{"eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "cfg:{{ eos_token }}"}]}"#;
        hf.insert("tokenizer_config.json", WeightBytes::from_vec(cfg.to_vec()));
        let t = ChatTemplate::from_source(&hf, Some(&md), None).unwrap().unwrap();
        assert_eq!(render(t), "cfg:</s>");

        assert!(ChatTemplate::from_source(&ModelSource::new("x"), None, None).unwrap().is_none());
        let err = ChatTemplate::from_source_required(&ModelSource::new("x"), None, None).unwrap_err();
        assert_eq!(err.to_string(), "chat template: model has no chat template; set one in the config");
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:05:09 UTC
        assert_eq!(format_utc(1_721_999_109, "%d %b %Y %H:%M:%S %%"), "26 Jul 2024 13:05:09 %");
        assert_eq!(format_utc(0, "%Y-%m-%d %B"), "1970-01-01 January");
    }

    #[test]
    fn roles_parse() {
        assert_eq!("user".parse::<Role>().unwrap(), Role::User);
        assert_eq!("developer".parse::<Role>().unwrap(), Role::System);
        assert_eq!("tool".parse::<Role>().unwrap(), Role::Tool);
        assert!("function".parse::<Role>().is_err());
    }

    #[test]
    fn render_options_kwargs_and_an_open_final_message() {
        let src = "{% if enable_thinking %}T:{% endif %}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<end>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let msgs = [ChatMessage::new(Role::User, "Hi"), ChatMessage::new(Role::Assistant, "Hello, I am")];
        let mut opts = RenderOptions::default();
        opts.kwargs.0.insert("enable_thinking".into(), serde_json::json!(true));
        // A kwarg cannot replace the conversation.
        opts.kwargs.0.insert("messages".into(), serde_json::json!([]));
        assert_eq!(
            t.render_with(&msgs, &opts).unwrap().expose(),
            "T:[user]Hi<end>[assistant]Hello, I am<end>[assistant]"
        );
        opts.continue_final_message = true;
        assert_eq!(t.render_with(&msgs, &opts).unwrap().expose(), "T:[user]Hi<end>[assistant]Hello, I am");
        let empty = [ChatMessage::new(Role::User, "Hi"), ChatMessage::new(Role::Assistant, "")];
        assert!(t.render_with(&empty, &opts).is_err(), "nothing to continue");
        assert_eq!(format!("{:?}", opts.kwargs), "TemplateKwargs([PHI; 2 entries])");
    }
}
