//! `sock_ops` + `sk_msg`: `traceparent` insertion (see `fathom_common::http`).
