//! OpenTelemetry export of delivery spans (`[otlp]`, built with the `otlp` feature).
//!
//! Each attempt becomes a client span, a child of the trace context the message arrived
//! with, and is batched to the collector over OTLP/HTTP by the SDK's own thread, so a slow
//! or absent collector costs deliveries nothing (the SDK drops spans when its queue is full).

use std::collections::HashMap;
use std::sync::Arc;

use ferry_core::{AttemptSpan, DeliveryTracer, Message, SinkResponse};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::OtlpPlan;

/// Starts spans on the exporting tracer.
pub struct OtlpTracer {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for OtlpTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpTracer")
    }
}

/// Builds the exporter; the provider must be shut down at exit to send what is queued.
pub fn start(plan: &OtlpPlan) -> anyhow::Result<(Arc<OtlpTracer>, SdkTracerProvider)> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(plan.traces_url.clone())
        .with_protocol(if plan.json {
            Protocol::HttpJson
        } else {
            Protocol::HttpBinary
        })
        .with_timeout(plan.timeout)
        .with_headers(plan.headers.iter().cloned().collect())
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            plan.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(plan.service_name.clone())
                .build(),
        )
        .build();
    let tracer = OtlpTracer {
        tracer: provider.tracer("ferry"),
        propagator: TraceContextPropagator::new(),
    };
    Ok((Arc::new(tracer), provider))
}

impl DeliveryTracer for OtlpTracer {
    fn start(
        &self,
        route: &Arc<str>,
        message: &Message,
        parent: Option<&str>,
    ) -> Box<dyn AttemptSpan> {
        let parent = match parent {
            Some(traceparent) => {
                let mut carrier = HashMap::with_capacity(2);
                carrier.insert("traceparent".to_owned(), traceparent.to_owned());
                if let Some(state) = message.attributes.get("tracestate") {
                    carrier.insert("tracestate".to_owned(), state.clone());
                }
                self.propagator.extract(&carrier)
            }
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(format!("deliver {route}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("ferry.route", route.to_string()),
                KeyValue::new("ferry.attempt", i64::from(message.attempt)),
                KeyValue::new("messaging.message.id", message.id.clone()),
                KeyValue::new("messaging.destination.name", message.source.to_string()),
                KeyValue::new("http.request.method", "POST"),
            ])
            .start_with_context(&self.tracer, &parent);
        let context = parent.with_span(span);
        let mut carrier = HashMap::with_capacity(2);
        self.propagator.inject_context(&context, &mut carrier);
        Box::new(Attempt {
            context,
            traceparent: carrier.remove("traceparent"),
        })
    }
}

struct Attempt {
    context: Context,
    traceparent: Option<String>,
}

impl AttemptSpan for Attempt {
    fn traceparent(&self) -> Option<String> {
        self.traceparent.clone()
    }

    fn finish(self: Box<Self>, response: &SinkResponse) {
        let span = self.context.span();
        match response {
            SinkResponse::Status { status, .. } => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(*status),
                ));
                if !(200..300).contains(status) {
                    span.set_attribute(KeyValue::new("error.type", status.to_string()));
                    span.set_status(Status::error(format!("status {status}")));
                }
            }
            SinkResponse::Timeout => {
                span.set_attribute(KeyValue::new("error.type", "timeout"));
                span.set_status(Status::error("timeout"));
            }
            SinkResponse::Error(detail) | SinkResponse::Unreachable(detail) => {
                span.set_attribute(KeyValue::new("error.type", "connection"));
                span.set_status(Status::error(detail.clone()));
            }
        }
        span.end();
    }
}
