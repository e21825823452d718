//! The OpenAPI 3.1 document of the admin API, served at `/admin/openapi.json`.

use serde_json::{Value, json};

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn answer(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {}}})
}

fn errors(mut responses: Value, codes: &[&str]) -> Value {
    for code in codes {
        responses[*code] = json!({"$ref": "#/components/responses/Error"});
    }
    responses["401"] = json!({"$ref": "#/components/responses/Error"});
    responses
}

fn op(summary: &str, request: Option<&str>, ok_code: &str, codes: &[&str]) -> Value {
    let mut operation = json!({
        "summary": summary,
        "responses": errors(json!({ok_code: answer("done")}), codes),
    });
    if let Some(schema) = request {
        operation["requestBody"] = body(schema);
    }
    operation
}

fn named(parameter: &str, description: &str) -> Value {
    json!([{"name": parameter, "in": "path", "required": true, "description": description,
        "schema": {"type": "string"}}])
}

/// The document.
pub(crate) fn document() -> Value {
    let model_codes = ["404", "409"];
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "hotpatch serve admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Rules, response cache and live patches of the model file the upstream llama-server maps. Every route needs `Authorization: Bearer <token>` unless the proxy runs with --admin-insecure-loopback. Errors are JSON: {\"error\": {\"code\", \"message\", \"status\"}}."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/admin/rules": {
                "get": op("List the rules, in order", None, "200", &[]),
                "post": op("Append a rule (409 when its name is taken)", Some("Rule"), "201", &["400", "409", "413", "415"]),
            },
            "/admin/rules/{name}": {
                "parameters": named("name", "The rule's name"),
                "put": op("Replace a rule in place", Some("Rule"), "200", &["400", "404", "409", "413", "415"]),
                "delete": op("Remove a rule", None, "200", &["404"]),
            },
            "/admin/rules/{name}/enable": {
                "parameters": named("name", "The rule's name"),
                "post": op("Enable a rule", None, "200", &["404"]),
            },
            "/admin/rules/{name}/disable": {
                "parameters": named("name", "The rule's name"),
                "post": op("Disable a rule", None, "200", &["404"]),
            },
            "/admin/cache": {
                "get": op("The cache settings and entry count", None, "200", &[]),
                "put": op("Change the cache settings (the cache starts empty)", Some("CacheSettings"), "200", &["400", "413", "415"]),
            },
            "/admin/tensors": {"get": op("The model's tensors", None, "200", &["409"])},
            "/admin/patches": {
                "get": op("Applied live patches", None, "200", &["409"]),
                "post": op("Apply a live patch (optionally temporary, optionally after draining in-flight requests); erases the upstream's prompt caches and says so in upstream_prompt_cache", Some("Patch"), "201", &["400", "404", "409", "413", "415"]),
            },
            "/admin/patches/{id}": {
                "parameters": [
                    {"name": "id", "in": "path", "required": true, "description": "The patch's id or name", "schema": {"type": "string"}},
                    {"name": "drain", "in": "query", "required": false, "description": "Drain in-flight requests first", "schema": {"type": "boolean"}}
                ],
                "delete": op("Revert a live patch; erases the upstream's prompt caches", None, "200", &model_codes),
            },
            "/admin/history": {"get": op("The model's patch history", None, "200", &["409"])},
            "/admin/stats": {"get": op("Statistics per hook and rule, cache, upstream and model", None, "200", &[])},
            "/admin/locks": {
                "get": op("Locked byte ranges", None, "200", &[]),
                "post": op("Lock a byte range: patches that touch it are refused with 409", Some("Lock"), "201", &["400", "404", "409", "413", "415"]),
            },
            "/admin/locks/{id}": {
                "parameters": named("id", "The lock's id"),
                "delete": op("Unlock", None, "200", &["404"]),
            },
            "/admin/openapi.json": {"get": op("This document", None, "200", &[])},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}}}},
                "Rule": {
                    "type": "object", "additionalProperties": false, "required": ["name", "action"],
                    "properties": {
                        "name": {"type": "string"},
                        "enabled": {"type": "boolean", "default": true},
                        "paths": {"type": "array", "items": {"type": "string"}, "description": "Default: the generation paths"},
                        "model": {"type": "string", "description": "An exact model name or a regex over the whole name"},
                        "action": {"$ref": "#/components/schemas/Action"}
                    }
                },
                "Action": {
                    "oneOf": [
                        {"type": "object", "additionalProperties": false, "required": ["type", "key", "value"], "properties": {"type": {"const": "set"}, "key": {"type": "string"}, "value": {}}},
                        {"type": "object", "additionalProperties": false, "required": ["type", "key", "value"], "properties": {"type": {"const": "override"}, "key": {"type": "string"}, "value": {}}},
                        {"type": "object", "additionalProperties": false, "required": ["type", "key"], "properties": {"type": {"const": "clamp"}, "key": {"type": "string"}, "min": {"type": "number"}, "max": {"type": "number"}}},
                        {"type": "object", "additionalProperties": false, "required": ["type", "text"], "properties": {"type": {"const": "system_prompt"}, "text": {"type": "string"}, "mode": {"enum": ["prepend", "merge"]}}},
                        {"type": "object", "additionalProperties": false, "required": ["type", "bias"], "properties": {"type": {"const": "logit_bias"}, "bias": {"type": "object", "additionalProperties": {"type": "number"}}}},
                        {"type": "object", "additionalProperties": false, "required": ["type", "pattern"], "properties": {"type": {"const": "redact"}, "pattern": {"type": "string"}, "regex": {"type": "boolean"}, "replacement": {"type": "string"}, "mask": {"type": "string", "maxLength": 1}}},
                        {"type": "object", "additionalProperties": false, "required": ["type"], "properties": {"type": {"const": "stop_stream"}, "after_chunks": {"type": "integer", "minimum": 1}, "pattern": {"type": "string"}, "regex": {"type": "boolean"}}}
                    ]
                },
                "CacheSettings": {"type": "object", "additionalProperties": false, "properties": {
                    "enabled": {"type": "boolean"}, "ttl_secs": {"type": "integer", "minimum": 1}, "max_entries": {"type": "integer", "minimum": 1}}},
                "Patch": {"type": "object", "additionalProperties": false, "required": ["name", "tensor", "transform"], "properties": {
                    "name": {"type": "string"},
                    "tensor": {"type": "string"},
                    "transform": {"oneOf": [
                        {"type": "object", "required": ["scale"], "properties": {"scale": {"type": "number"}}},
                        {"type": "object", "required": ["offset"], "properties": {"offset": {"type": "number"}}},
                        {"type": "object", "required": ["clamp"], "properties": {"clamp": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}},
                        {"type": "object", "required": ["zero"], "properties": {"zero": {"const": true}}},
                        {"type": "object", "required": ["set"], "properties": {"set": {"type": "array", "items": {"type": "number"}}}}
                    ]},
                    "range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2, "description": "Element range [start, end), whole blocks of the tensor's type (refused otherwise)"},
                    "priority": {"type": "integer"},
                    "ttl_secs": {"type": "integer", "minimum": 1, "description": "Revert by itself after this long"},
                    "drain": {"type": "boolean", "description": "Hold new requests and wait for in-flight ones first"},
                    "drain_timeout_secs": {"type": "integer"}
                }},
                "Lock": {"type": "object", "additionalProperties": false, "properties": {
                    "tensor": {"type": "string"},
                    "range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                    "start": {"type": "integer"}, "end": {"type": "integer"}, "reason": {"type": "string"}}}
            }
        }
    })
}
