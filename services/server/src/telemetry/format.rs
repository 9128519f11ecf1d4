//! Log lines that carry the trace id of the span they were written in, so a line found in a
//! log search leads to its trace (and back).

use tracing::{Event, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Wraps an event formatter: text lines get a `trace_id=... ` prefix, JSON objects a
/// `"trace_id"` member, whenever the event happens inside a span with a valid trace.
pub(crate) struct WithTraceId<F> {
    inner: F,
    json: bool,
}

impl<F> WithTraceId<F> {
    pub(crate) fn text(inner: F) -> Self {
        Self { inner, json: false }
    }

    pub(crate) fn json(inner: F) -> Self {
        Self { inner, json: true }
    }
}

fn current_trace_id<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<opentelemetry::TraceId>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let span = ctx.lookup_current()?;
    for span in span.scope() {
        if let Some(id) = span
            .extensions()
            .get::<OtelData>()
            .and_then(OtelData::trace_id)
            .filter(|id| *id != opentelemetry::TraceId::INVALID)
        {
            return Some(id);
        }
    }
    None
}

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(trace_id) = current_trace_id(ctx) else {
            return self.inner.format_event(ctx, writer, event);
        };
        if self.json {
            let mut line = String::new();
            self.inner
                .format_event(ctx, Writer::new(&mut line), event)?;
            match line.strip_prefix('{') {
                Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
                None => writer.write_str(&line),
            }
        } else {
            write!(writer, "trace_id={trace_id} ")?;
            self.inner.format_event(ctx, writer, event)
        }
    }
}
