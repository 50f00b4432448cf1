//! Chat templates: messages to text segments, each marked as prompt or completion.

use super::ChatTemplate;

/// The speaker of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// The user's turn.
    User,
    /// The model's turn: the completion that carries loss.
    Assistant,
}

impl Role {
    /// Reads `system`, `user`, `assistant` or `model` (Gemma's name for the assistant).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" | "model" => Some(Role::Assistant),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

/// A piece of an example's text; `loss` marks completion text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub text: String,
    pub loss: bool,
}

impl Segment {
    pub(crate) fn new(text: impl Into<String>, loss: bool) -> Self {
        Segment {
            text: text.into(),
            loss,
        }
    }
}

/// Appends a segment, merging it into the previous one when both have the same flag, so that
/// a prompt is encoded in one piece exactly as it is at generation time.
fn push(out: &mut Vec<Segment>, text: &str, loss: bool) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.loss == loss => last.text.push_str(text),
        _ => out.push(Segment::new(text, loss)),
    }
}

/// One turn after template-specific role handling: (role name as the template spells it,
/// content, is assistant).
fn turns(template: ChatTemplate, messages: &[ChatMessage]) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    match template {
        ChatTemplate::Gemma => {
            // No system role: hold system text and prepend it to the next user message.
            let mut pending: Option<String> = None;
            for m in messages {
                match m.role {
                    Role::System => {
                        pending = Some(match pending.take() {
                            Some(p) => format!("{p}\n\n{}", m.content),
                            None => m.content.clone(),
                        });
                    }
                    Role::User => {
                        let content = match pending.take() {
                            Some(p) => format!("{p}\n\n{}", m.content),
                            None => m.content.clone(),
                        };
                        out.push(("user".to_string(), content, false));
                    }
                    Role::Assistant => {
                        if let Some(p) = pending.take() {
                            out.push(("user".to_string(), p, false));
                        }
                        out.push(("model".to_string(), m.content.clone(), true));
                    }
                }
            }
            if let Some(p) = pending {
                out.push(("user".to_string(), p, false));
            }
        }
        _ => {
            for m in messages {
                out.push((
                    m.role.name().to_string(),
                    m.content.clone(),
                    m.role == Role::Assistant,
                ));
            }
        }
    }
    out
}

/// (turn header, end-of-turn marker that carries loss on assistant turns, separator after it)
fn markers(template: ChatTemplate, role: &str) -> (String, &'static str, &'static str) {
    match template {
        ChatTemplate::Gemma => (format!("<start_of_turn>{role}\n"), "<end_of_turn>", "\n"),
        ChatTemplate::ChatMl => (format!("<|im_start|>{role}\n"), "<|im_end|>", "\n"),
        ChatTemplate::Llama3 => (
            format!("<|start_header_id|>{role}<|end_header_id|>\n\n"),
            "<|eot_id|>",
            "",
        ),
        ChatTemplate::Plain => (format!("{role}: "), "\n", ""),
    }
}

/// The conversation as segments: headers and separators are prompt, assistant contents and
/// their end-of-turn markers are completion.
pub(crate) fn chat_segments(template: ChatTemplate, messages: &[ChatMessage]) -> Vec<Segment> {
    let mut out = Vec::new();
    for (role, content, assistant) in turns(template, messages) {
        let (header, end, sep) = markers(template, &role);
        push(&mut out, &header, false);
        push(&mut out, &content, assistant);
        push(&mut out, end, assistant);
        push(&mut out, sep, false);
    }
    out
}

/// The conversation as one string (no BOS: the encoder adds it). With
/// `add_generation_prompt`, the assistant's turn header follows, ready for generation.
///
/// | template | turn |
/// |---|---|
/// | gemma | `<start_of_turn>user\n{content}<end_of_turn>\n` (assistant: `model`) |
/// | chatml | `<\|im_start\|>{role}\n{content}<\|im_end\|>\n` |
/// | llama3 | `<\|start_header_id\|>{role}<\|end_header_id\|>\n\n{content}<\|eot_id\|>` |
/// | plain | `{role}: {content}\n` |
pub fn render_chat(
    template: ChatTemplate,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> String {
    let mut s: String = chat_segments(template, messages)
        .into_iter()
        .map(|s| s.text)
        .collect();
    if add_generation_prompt {
        let role = if template == ChatTemplate::Gemma {
            "model"
        } else {
            "assistant"
        };
        s.push_str(&markers(template, role).0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_string(),
        }
    }

    fn conv() -> Vec<ChatMessage> {
        vec![
            msg(Role::System, "Be brief."),
            msg(Role::User, "Hi"),
            msg(Role::Assistant, "Hello"),
        ]
    }

    #[test]
    fn gemma_merges_system_into_user_and_marks_model_turn() {
        let segs = chat_segments(ChatTemplate::Gemma, &conv());
        assert_eq!(
            segs,
            vec![
                Segment::new(
                    "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
                    false
                ),
                Segment::new("Hello<end_of_turn>", true),
                Segment::new("\n", false),
            ]
        );
    }

    #[test]
    fn chatml_llama3_plain_strings() {
        assert_eq!(
            render_chat(ChatTemplate::ChatMl, &conv(), false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello<|im_end|>\n"
        );
        assert_eq!(
            render_chat(ChatTemplate::Llama3, &conv(), false),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        );
        assert_eq!(
            render_chat(ChatTemplate::Plain, &conv(), false),
            "system: Be brief.\nuser: Hi\nassistant: Hello\n"
        );
    }

    #[test]
    fn generation_prompt_matches_training_prompt() {
        let c = conv();
        for t in [
            ChatTemplate::Gemma,
            ChatTemplate::ChatMl,
            ChatTemplate::Llama3,
            ChatTemplate::Plain,
        ] {
            let prompt = render_chat(t, &c[..2], true);
            let segs = chat_segments(t, &c);
            assert_eq!(segs[0].text, prompt, "{t:?}");
            assert!(!segs[0].loss && segs[1].loss, "{t:?}");
        }
    }

    #[test]
    fn gemma_system_without_following_user_becomes_user_turn() {
        let c = vec![msg(Role::System, "S"), msg(Role::Assistant, "A")];
        assert_eq!(
            render_chat(ChatTemplate::Gemma, &c, false),
            "<start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
        );
    }

    #[test]
    fn roles_parse() {
        assert_eq!(Role::parse("model"), Some(Role::Assistant));
        assert_eq!(Role::parse("assistant"), Some(Role::Assistant));
        assert_eq!(Role::parse("bot"), None);
    }
}
