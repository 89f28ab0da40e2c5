//! Line formats: one JSON object per event, or human-readable text. Both
//! hide the values of fields named like a secret (see
//! [`is_secret_field`](crate::is_secret_field)).

use std::fmt;
use std::sync::Arc;

use chrono::SecondsFormat;
use domain::Clock;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::redact::{REDACTED, is_secret_field};

/// Keys written by the JSON format itself. A field with one of these names
/// is written as `field.NAME` so it cannot overwrite them.
const RESERVED_KEYS: [&str; 5] = ["timestamp", "level", "target", "message", "spans"];

/// Collects fields into a JSON map, hiding secret-named ones.
struct JsonVisitor<'a> {
    map: &'a mut Map<String, Value>,
}

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let value = if is_secret_field(field.name()) {
            Value::String(REDACTED.to_owned())
        } else {
            value
        };
        self.map.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let number = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.insert(field, number);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::from(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}

/// Span field formatter for the JSON format: stores a span's fields as a
/// JSON object, which [`JsonFormat`] merges into each event's line.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut JsonVisitor { map: &mut map });
        writer.write_str(&Value::Object(map).to_string())
    }

    /// Merges fields recorded later (`span.record(...)`) into the stored
    /// object. Several layers share the stored object and each of them calls
    /// this for the same record, so the merge must be idempotent.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str::<Value>(&current.fields) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        fields.record(&mut JsonVisitor { map: &mut map });
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

/// Event format writing one JSON object per line. Each object has
/// `timestamp` (RFC 3339, UTC), `level`, `target`, `message` and `spans`
/// (names, outermost first). The fields of every enclosing span and of the
/// event follow, and an inner value replaces an outer one of the same name.
#[derive(Debug, Clone)]
pub struct JsonFormat {
    clock: Arc<dyn Clock>,
}

impl JsonFormat {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock }
    }
}

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                spans.push(Value::from(span.name()));
                let extensions = span.extensions();
                let Some(stored) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&stored.fields) {
                    fields.extend(map);
                }
            }
        }
        event.record(&mut JsonVisitor { map: &mut fields });

        let message = match fields.remove("message") {
            Some(Value::String(text)) => text,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let metadata = event.metadata();
        let timestamp = self
            .clock
            .now()
            .to_rfc3339_opts(SecondsFormat::Micros, true);

        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":");
        line.push_str(&Value::from(timestamp).to_string());
        line.push_str(",\"level\":");
        line.push_str(&Value::from(metadata.level().as_str()).to_string());
        line.push_str(",\"target\":");
        line.push_str(&Value::from(metadata.target()).to_string());
        line.push_str(",\"message\":");
        line.push_str(&Value::from(message).to_string());
        if !spans.is_empty() {
            line.push_str(",\"spans\":");
            line.push_str(&Value::Array(spans).to_string());
        }
        for (name, value) in fields {
            let key = if RESERVED_KEYS.contains(&name.as_str()) {
                format!("field.{name}")
            } else {
                name
            };
            line.push(',');
            line.push_str(&Value::from(key).to_string());
            line.push(':');
            line.push_str(&value.to_string());
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Field formatter for the human-readable format: `message name=value ...`
/// with secret-named values hidden.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrettyFields;

struct PrettyVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl PrettyVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{value:?}")
        } else if is_secret_field(field.name()) {
            write!(self.writer, "{separator}{}={REDACTED}", field.name())
        } else {
            write!(self.writer, "{separator}{}={value:?}", field.name())
        };
    }
}

impl Visit for PrettyVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // Strings print without the quotes `Debug` would add.
        self.write(field, &format_args!("{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, value);
    }
}

impl<'writer> FormatFields<'writer> for PrettyFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = PrettyVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}
