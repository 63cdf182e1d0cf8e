//! Every transport over real sockets, with clients written from the
//! protocol crate's client-side types.

mod grpc;
mod http;
mod support;
mod tls;
mod unix;
