//! Delivery of composed messages: [`Mailer`] and its two implementations.
//!
//! [`SmtpMailer`] hands messages to an SMTP server (`smtp://` or `smtps://`,
//! credentials in the URL). [`FileMailer`] writes each message as
//! `<data_dir>/mail/<notification id>.eml` for development without a mail
//! server. [`mailer_from_config`] picks one: SMTP when `smtp_url` is set.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::config::Config;
use anyhow::Context as _;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::domain::Email;
use crate::templates::RenderedEmail;

/// How long one SMTP conversation may stall (connect, each command) before
/// the send counts as failed, so that a hung server cannot hold a claim and
/// an event consumer forever.
const SMTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Failure reasons are stored and listed; a server that answers with a novel
/// is cut short.
const MAX_REASON_CHARS: usize = 500;

/// Why a message could not be delivered, in words fit for `failure_reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MailError(String);

/// The prefix of a failure reason that retrying will not fix.
pub const PERMANENT_SMTP: &str = "smtp (permanent)";

impl MailError {
    /// A failure with this reason (trimmed to a storable length).
    pub fn new(reason: impl fmt::Display) -> Self {
        Self(reason.to_string().chars().take(MAX_REASON_CHARS).collect())
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// The future a [`Mailer`] returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), MailError>> + Send + 'a>>;

/// Delivers composed messages. Object-safe, so the notifier can hold whichever
/// one the configuration chose.
pub trait Mailer: Send + Sync + 'static {
    /// Delivers `message`, the email of notification `notification_id`.
    /// `Ok` means it was accepted for delivery (by the SMTP server, or
    /// written completely to the mail folder).
    fn send<'a>(&'a self, notification_id: &'a str, message: &'a Message) -> SendFuture<'a>;
}

/// The mailer the configuration asks for: SMTP when `smtp_url` is set,
/// otherwise `.eml` files under `<data_dir>/mail/`.
pub fn mailer_from_config(config: &Config) -> anyhow::Result<Arc<dyn Mailer>> {
    Ok(match &config.smtp_url {
        Some(url) => Arc::new(SmtpMailer::from_url(url.expose())?),
        None => Arc::new(FileMailer::new(config.data_dir.join("mail"))),
    })
}

/// Sends through an SMTP server, over a small pool of reused connections.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    /// A mailer for `smtp://host[:port]` (plain, or STARTTLS with `?tls=required`)
    /// or `smtps://user:password@host[:port]` (TLS from the start). Nothing is
    /// connected yet; a server that is down makes sends fail, not this.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            // The URL may hold a password: name the setting, never the value.
            .context("smtp_url is not a valid smtp:// or smtps:// url")?
            .timeout(Some(SMTP_TIMEOUT))
            .build();
        Ok(Self { transport })
    }
}

impl fmt::Debug for SmtpMailer {
    // The transport holds the credentials; keep them out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpMailer").finish_non_exhaustive()
    }
}

impl Mailer for SmtpMailer {
    fn send<'a>(&'a self, _notification_id: &'a str, message: &'a Message) -> SendFuture<'a> {
        Box::pin(async move {
            self.transport
                .send(message.clone())
                .await
                .map(|_| ())
                .map_err(|err| {
                    // A permanent rejection (a 5xx: no such mailbox) will not
                    // go through on a retry; the consumer gives up sooner.
                    let kind = if err.is_permanent() {
                        PERMANENT_SMTP
                    } else {
                        "smtp"
                    };
                    MailError::new(format_args!("{kind}: {err}"))
                })
        })
    }
}

/// Writes each message as `<mail folder>/<notification id>.eml`.
#[derive(Clone, Debug)]
pub struct FileMailer {
    dir: PathBuf,
}

impl FileMailer {
    /// A mailer writing into the folder `dir`, created on first use.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder messages are written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn write(&self, notification_id: &str, message: &Message) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;

        tokio::fs::create_dir_all(&self.dir).await?;
        // A dot-file with a unique name in the same folder: readers looking
        // for `*.eml` never see it, and the rename below is atomic because it
        // stays on one file system.
        let temp = self.dir.join(format!(
            ".{notification_id}.{}.tmp",
            uuid::Uuid::new_v4().simple()
        ));
        let target = self.dir.join(format!("{notification_id}.eml"));
        let written = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            file.write_all(&message.formatted()).await?;
            // On disk before it becomes visible: a crash leaves no empty .eml.
            file.sync_all().await?;
            tokio::fs::rename(&temp, &target).await
        }
        .await;
        if written.is_err() {
            // Best effort: the temp file is invisible to readers anyway.
            let _ = tokio::fs::remove_file(&temp).await;
        }
        written
    }
}

impl Mailer for FileMailer {
    fn send<'a>(&'a self, notification_id: &'a str, message: &'a Message) -> SendFuture<'a> {
        Box::pin(async move {
            // The id becomes a file name: it must not be able to leave the mail folder.
            let safe = !notification_id.is_empty()
                && notification_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !safe {
                return Err(MailError::new(format_args!(
                    "mail folder: {notification_id:?} is not a notification id"
                )));
            }
            self.write(notification_id, message)
                .await
                .map_err(|err| MailError::new(format_args!("mail folder: {err}")))
        })
    }
}

/// The RFC 5322 message for a rendered email: plain text with an HTML
/// alternative, and a `Message-ID` derived from the notification id so that
/// a resend after a lost acknowledgement can be recognized as the same mail.
pub fn compose_message(
    from: &Mailbox,
    to: &Email,
    notification_id: &str,
    email: &RenderedEmail,
) -> Result<Message, MailError> {
    let to: Mailbox = to
        .as_str()
        .parse()
        .map_err(|err| MailError::new(format_args!("recipient: {err}")))?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(format!("<{notification_id}@{}>", from.email.domain())))
        .multipart(MultiPart::alternative_plain_html(
            email.text.clone(),
            email.html.clone(),
        ))
        .map_err(|err| MailError::new(format_args!("composing the message: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::welcome;

    fn message(id: &str) -> Message {
        let from: Mailbox = "Agora <no-reply@agora.test>".parse().expect("mailbox");
        let to = Email::parse("ada@example.com").expect("email");
        compose_message(&from, &to, id, &welcome("Ada", "ada@example.com")).expect("compose")
    }

    #[test]
    fn messages_have_both_parts_and_a_stable_message_id() {
        let id = uuid::Uuid::now_v7().to_string();
        let raw = String::from_utf8(message(&id).formatted()).expect("utf-8");
        assert!(
            raw.contains(&format!("Message-ID: <{id}@agora.test>")),
            "{raw}"
        );
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(
            raw.contains("text/plain") && raw.contains("text/html"),
            "{raw}"
        );
        assert!(raw.contains("To: ada@example.com"), "{raw}");
    }

    #[tokio::test]
    async fn the_file_mailer_writes_whole_files_and_no_temp_files_remain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mailer = FileMailer::new(dir.path().join("mail"));
        let id = uuid::Uuid::now_v7().to_string();
        let message = message(&id);
        mailer.send(&id, &message).await.expect("send");
        let names: Vec<_> = std::fs::read_dir(mailer.dir())
            .expect("mail folder exists")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(format!("{id}.eml"))]);
        let written = std::fs::read(mailer.dir().join(format!("{id}.eml"))).expect("read");
        assert_eq!(written, message.formatted());
    }

    #[tokio::test]
    async fn the_file_mailer_refuses_ids_that_would_leave_the_mail_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mailer = FileMailer::new(dir.path().join("mail"));
        for id in ["../escape", "", "a/b"] {
            let err = mailer.send(id, &message("x")).await.expect_err("unsafe id");
            assert!(err.reason().starts_with("mail folder:"), "{err}");
        }
        assert!(!dir.path().join("escape.eml").exists());
    }

    #[test]
    fn smtp_urls_are_checked_without_leaking_them() {
        let err = SmtpMailer::from_url("not a url with hunter2").expect_err("invalid");
        assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
    }

    #[test]
    fn failure_reasons_are_bounded() {
        assert_eq!(MailError::new("x".repeat(10_000)).reason().len(), 500);
    }
}
