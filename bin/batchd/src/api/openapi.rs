//! The OpenAPI document, built from the route annotations.

use actix_web::HttpResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(title = "batchd", description = "Durable batch jobs over HTTP. Every error has the body {code, message, correlationId}."),
    paths(
        super::batches::create,
        super::batches::list,
        super::batches::get,
        super::batches::items,
        super::batches::cancel,
        super::batches::retry,
        super::jobs::get,
        super::dead_letters::list,
        super::dead_letters::redrive,
        super::admin::kinds,
        super::admin::pause,
        super::admin::resume,
        super::flags::list,
        super::flags::create,
        super::flags::get,
        super::flags::update,
        super::flags::delete,
        super::flags::evaluate,
        super::flags::audit,
        super::health::health,
        super::health::ready,
        super::health::metrics,
        super::ws::connect,
        super::ws::ticket,
        document,
    ),
    components(schemas(crate::error::ErrorBody, super::batches::CreateBatchRequest, super::dead_letters::RedriveRequest, super::flags::CreateFlagRequest, super::flags::UpdateFlagRequest)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "this document", body = Object))
)]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
