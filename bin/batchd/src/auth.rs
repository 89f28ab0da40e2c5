//! Bearer-token authentication: HS256 JWTs signed with the configured
//! secret. `sub` is the user id; `role: "admin"` marks an operator.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use domain::{Scope, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Longest accepted user id, in bytes.
const MAX_USER_ID: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub exp: u64,
    pub iat: u64,
}

/// Keys for signing and checking tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("Auth { .. }")
    }
}

impl Auth {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Mints a token for `user`, valid for `ttl_seconds`.
    pub fn mint(&self, user: &str, admin: bool, ttl_seconds: u64) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user.to_owned(),
            role: admin.then(|| "admin".to_owned()),
            exp: now + ttl_seconds,
            iat: now,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// Checks a token and returns the user it names.
    pub fn verify(&self, token: &str) -> Result<AuthUser, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                match error.kind() {
                    ErrorKind::ExpiredSignature => ApiError::unauthorized(
                        "TOKEN_EXPIRED",
                        "the bearer token has expired; request a new one",
                    ),
                    _ => ApiError::unauthorized("TOKEN_INVALID", "the bearer token is invalid"),
                }
            })?;
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > MAX_USER_ID {
            return Err(ApiError::unauthorized(
                "TOKEN_INVALID",
                "the token's subject must be a user id of 1 to 128 bytes",
            ));
        }
        Ok(AuthUser {
            id: UserId(sub),
            admin: data.claims.role.as_deref() == Some("admin"),
        })
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: UserId,
    pub admin: bool,
}

impl AuthUser {
    /// Returns what the caller may see: their own data, or everything for an admin
    /// on admin routes.
    pub fn own_scope(&self) -> Scope {
        Scope::Owner(self.id.clone())
    }
}

fn bearer(request: &HttpRequest) -> Result<&str, ApiError> {
    let header = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "TOKEN_MISSING",
                "send an Authorization: Bearer <token> header",
            )
        })?;
    let value = header.to_str().map_err(|_| {
        ApiError::unauthorized(
            "TOKEN_INVALID",
            "the Authorization header is not valid text",
        )
    })?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized(
                "TOKEN_INVALID",
                "the Authorization header must use the Bearer scheme",
            )
        })?;
    Ok(token.trim())
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = (|| -> Result<AuthUser, ApiError> {
            let auth = request
                .app_data::<web::Data<Auth>>()
                .ok_or_else(|| ApiError::internal(&"authentication keys are not configured"))?;
            let user = auth.verify(bearer(request)?)?;
            request.extensions_mut_insert(user.clone());
            Ok(user)
        })();
        if let Err(error) = &result {
            tracing::warn!(target: "security", code = error.code, path = %request.path(), peer = %request.peer_addr().map_or_else(|| "unknown".to_owned(), |addr| addr.ip().to_string()), "authentication failed");
        }
        ready(result)
    }
}

/// An authenticated caller with the admin role.
#[derive(Debug, Clone)]
pub struct AdminUser(pub AuthUser);

impl FromRequest for AdminUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let result = match AuthUser::from_request(request, payload).into_inner() {
            Ok(user) if user.admin => Ok(AdminUser(user)),
            Ok(user) => {
                tracing::warn!(target: "security", user_id = %user.id, path = %request.path(), "admin route denied");
                Err(ApiError::forbidden(
                    "FORBIDDEN",
                    "this route needs the admin role",
                ))
            }
            Err(error) => Err(error),
        };
        ready(result)
    }
}

trait ExtensionsInsert {
    fn extensions_mut_insert(&self, user: AuthUser);
}

impl ExtensionsInsert for HttpRequest {
    fn extensions_mut_insert(&self, user: AuthUser) {
        use actix_web::HttpMessage;
        self.extensions_mut().insert(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_token_verifies() {
        let auth = Auth::new(SECRET);
        let token = auth.mint("alice", true, 60).unwrap();
        let user = auth.verify(&token).unwrap();
        assert_eq!(user.id.as_str(), "alice");
        assert!(user.admin);
    }

    #[test]
    fn wrong_key_is_rejected() {
        let token = Auth::new("another-secret-another-secret-xx")
            .mint("alice", false, 60)
            .unwrap();
        let error = Auth::new(SECRET).verify(&token).unwrap_err();
        assert_eq!(error.code, "TOKEN_INVALID");
    }

    #[test]
    fn expired_token_is_rejected() {
        let auth = Auth::new(SECRET);
        let claims = Claims {
            sub: "alice".into(),
            role: None,
            exp: 1_000,
            iat: 900,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth.verify(&token).unwrap_err().code, "TOKEN_EXPIRED");
    }

    #[test]
    fn unsigned_token_is_rejected() {
        // Header {"alg":"none","typ":"JWT"}, payload {"sub":"alice","exp":9999999999}, no signature.
        let token =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert_eq!(
            Auth::new(SECRET).verify(token).unwrap_err().code,
            "TOKEN_INVALID"
        );
    }

    #[test]
    fn token_signed_with_another_algorithm_is_rejected() {
        let claims = Claims {
            sub: "alice".into(),
            role: Some("admin".into()),
            exp: 9_999_999_999,
            iat: 0,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            Auth::new(SECRET).verify(&token).unwrap_err().code,
            "TOKEN_INVALID"
        );
    }
}
