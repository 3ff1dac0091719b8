//! Typed API errors and their AWS REST-JSON wire form.

/// Every error type the server may answer with.
///
/// The first group are the error shapes of the service model (their status
/// codes are asserted against the model's `error.httpStatusCode` in a test);
/// the rest are answered by the AWS front door before the service sees the
/// request (routing and SigV4 authentication), so the model does not list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `ValidationException`, 400.
    Validation,
    /// `AccessDeniedException`, 403.
    AccessDenied,
    /// `ResourceNotFoundException`, 404.
    ResourceNotFound,
    /// `ConflictException`, 409.
    Conflict,
    /// `ServiceQuotaExceededException`, 402 (sic: the model says 402).
    ServiceQuotaExceeded,
    /// `ThrottlingException`, 429.
    Throttling,
    /// `InternalServerException`, 500.
    InternalServer,
    /// `InsufficientCapacityException`, 500 (RunMicrovm).
    InsufficientCapacity,
    /// `TooManyRequestsException`, 429 (the tag operations, shared with Lambda).
    TooManyRequests,
    /// `ServiceException`, 500 (the tag operations).
    Service,
    /// `InvalidParameterValueException`, 400 (the tag operations).
    InvalidParameterValue,
    /// `ResourceConflictException`, 409 (the tag operations).
    ResourceConflict,
    /// `UnknownOperationException`, 404: no operation matches method and path.
    UnknownOperation,
    /// `MissingAuthenticationTokenException`, 403: no `Authorization` header
    /// (nor presigned query). AWS's message is "Missing Authentication Token".
    MissingAuthenticationToken,
    /// `InvalidSignatureException`, 403: the signature does not match, or the
    /// request is expired. This is what Lambda answers (botocore maps it for
    /// the `lambda` signing name; the SDK retries on clock skew with it).
    InvalidSignature,
    /// `UnrecognizedClientException`, 403: the access key id is unknown
    /// ("The security token included in the request is invalid.").
    UnrecognizedClient,
    /// `IncompleteSignatureException`, 400: the `Authorization` header is
    /// malformed (missing Credential/SignedHeaders/Signature, bad scope).
    IncompleteSignature,
    /// `SerializationException`, 400: kept for callers that want AWS's answer
    /// to an undecodable body; `parse_input` itself answers Validation.
    Serialization,
}

impl ErrorCode {
    /// All codes, for tests and exhaustive tables.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Validation,
        ErrorCode::AccessDenied,
        ErrorCode::ResourceNotFound,
        ErrorCode::Conflict,
        ErrorCode::ServiceQuotaExceeded,
        ErrorCode::Throttling,
        ErrorCode::InternalServer,
        ErrorCode::InsufficientCapacity,
        ErrorCode::TooManyRequests,
        ErrorCode::Service,
        ErrorCode::InvalidParameterValue,
        ErrorCode::ResourceConflict,
        ErrorCode::UnknownOperation,
        ErrorCode::MissingAuthenticationToken,
        ErrorCode::InvalidSignature,
        ErrorCode::UnrecognizedClient,
        ErrorCode::IncompleteSignature,
        ErrorCode::Serialization,
    ];

    /// The HTTP status code this error is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Validation => 400,
            ErrorCode::AccessDenied => 403,
            ErrorCode::ResourceNotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::ServiceQuotaExceeded => 402,
            ErrorCode::Throttling => 429,
            ErrorCode::InternalServer => 500,
            ErrorCode::InsufficientCapacity => 500,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Service => 500,
            ErrorCode::InvalidParameterValue => 400,
            ErrorCode::ResourceConflict => 409,
            ErrorCode::UnknownOperation => 404,
            ErrorCode::MissingAuthenticationToken => 403,
            ErrorCode::InvalidSignature => 403,
            ErrorCode::UnrecognizedClient => 403,
            ErrorCode::IncompleteSignature => 400,
            ErrorCode::Serialization => 400,
        }
    }

    /// The error type name sent in `x-amzn-errortype`, which botocore uses to
    /// pick the modeled exception class.
    pub fn type_name(self) -> &'static str {
        match self {
            ErrorCode::Validation => "ValidationException",
            ErrorCode::AccessDenied => "AccessDeniedException",
            ErrorCode::ResourceNotFound => "ResourceNotFoundException",
            ErrorCode::Conflict => "ConflictException",
            ErrorCode::ServiceQuotaExceeded => "ServiceQuotaExceededException",
            ErrorCode::Throttling => "ThrottlingException",
            ErrorCode::InternalServer => "InternalServerException",
            ErrorCode::InsufficientCapacity => "InsufficientCapacityException",
            ErrorCode::TooManyRequests => "TooManyRequestsException",
            ErrorCode::Service => "ServiceException",
            ErrorCode::InvalidParameterValue => "InvalidParameterValueException",
            ErrorCode::ResourceConflict => "ResourceConflictException",
            ErrorCode::UnknownOperation => "UnknownOperationException",
            ErrorCode::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            ErrorCode::InvalidSignature => "InvalidSignatureException",
            ErrorCode::UnrecognizedClient => "UnrecognizedClientException",
            ErrorCode::IncompleteSignature => "IncompleteSignatureException",
            ErrorCode::Serialization => "SerializationException",
        }
    }

    /// The inverse of [`ErrorCode::type_name`].
    pub fn from_type_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.type_name() == name)
    }

    /// Whether the fault is the caller's (4xx) rather than the service's.
    pub fn is_client_fault(self) -> bool {
        self.status() < 500
    }
}

/// An error answered to the API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Validation, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::ResourceNotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Conflict, message)
    }

    pub fn access_denied(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::AccessDenied, message)
    }

    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::ServiceQuotaExceeded, message)
    }

    pub fn throttling(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Throttling, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InternalServer, message)
    }

    pub fn insufficient_capacity(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InsufficientCapacity, message)
    }

    /// What API Gateway-fronted AWS services answer for a path or method that
    /// matches no operation.
    pub fn unknown_operation() -> Self {
        ApiError::new(ErrorCode::UnknownOperation, "Unknown operation")
    }

    /// The answer to a request without any authentication.
    pub fn missing_authentication_token() -> Self {
        ApiError::new(
            ErrorCode::MissingAuthenticationToken,
            "Missing Authentication Token",
        )
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The JSON body: `{"message": "..."}`.
    pub fn body(&self) -> Vec<u8> {
        // Serializing a map of one string cannot fail; fall back to a fixed
        // body rather than panic anyway.
        serde_json::to_vec(&serde_json::json!({ "message": self.message }))
            .unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The full AWS REST-JSON error response: status, `x-amzn-errortype`
    /// (botocore reads the type from it first), `content-type` and the body.
    pub fn to_http(&self) -> http::Response<Vec<u8>> {
        let mut response = http::Response::new(self.body());
        *response.status_mut() = http::StatusCode::from_u16(self.status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            "x-amzn-errortype",
            http::HeaderValue::from_static(self.code.type_name()),
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}
