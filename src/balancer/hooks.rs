//! User hooks into the transport: a custom connector that yields the byte stream, and a tower
//! layer around every RPC attempt (for metrics, logging, fault injection).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A byte stream a custom connector yields.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub(crate) type ConnectFuture =
    Pin<Box<dyn Future<Output = std::result::Result<Box<dyn Io>, BoxError>> + Send>>;

/// A type-erased user connector (`tower::Service<http::Uri>` yielding a byte stream).
#[derive(Clone)]
pub(crate) struct DynConnector {
    connect: Arc<dyn Fn(http::Uri) -> ConnectFuture + Send + Sync>,
}

impl fmt::Debug for DynConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DynConnector")
    }
}

impl DynConnector {
    pub(crate) fn new<C, IO>(connector: C) -> Self
    where
        C: tower::Service<http::Uri, Response = IO> + Clone + Send + Sync + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let connect = move |uri: http::Uri| -> ConnectFuture {
            let mut svc = connector.clone();
            Box::pin(async move {
                use tower::ServiceExt;
                let io = svc
                    .ready()
                    .await
                    .map_err(Into::into)?
                    .call(uri)
                    .await
                    .map_err(Into::into)?;
                Ok(Box::new(io) as Box<dyn Io>)
            })
        };
        DynConnector {
            connect: Arc::new(connect),
        }
    }

    /// Open a byte stream to `uri` through the user's connector.
    pub(crate) fn connect(&self, uri: http::Uri) -> ConnectFuture {
        (self.connect)(uri)
    }
}

/// One RPC attempt as a user layer sees it: which RPC, to which endpoint. Calling the inner
/// service performs the attempt; its error is the attempt's typed [`Error`].
#[non_exhaustive]
pub struct RpcRequest {
    /// The RPC, e.g. `"Range"`, `"Put"`, `"MemberList"`.
    pub method: &'static str,
    /// The endpoint the attempt goes to, as configured.
    pub endpoint: String,
    run: Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>>,
}

impl fmt::Debug for RpcRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcRequest")
            .field("method", &self.method)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl RpcRequest {
    pub(crate) fn new(
        method: &'static str,
        endpoint: String,
        run: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
    ) -> Self {
        RpcRequest {
            method,
            endpoint,
            run: Some(run),
        }
    }
}

/// The service a user layer wraps: it performs the attempt described by the [`RpcRequest`].
pub type RpcService = tower::util::BoxCloneSyncService<RpcRequest, (), Error>;

/// The innermost [`RpcService`]: runs the attempt.
pub(crate) fn innermost() -> RpcService {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|mut req: RpcRequest| async move {
        match req.run.take() {
            Some(run) => run.await,
            None => Ok(()),
        }
    }))
}

/// A type-erased user layer.
#[derive(Clone)]
pub(crate) struct DynLayer(pub(crate) Arc<dyn Fn(RpcService) -> RpcService + Send + Sync>);

impl fmt::Debug for DynLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DynLayer")
    }
}

impl DynLayer {
    pub(crate) fn new<L>(layer: L) -> Self
    where
        L: tower::Layer<RpcService> + Send + Sync + 'static,
        L::Service: tower::Service<RpcRequest, Response = (), Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<RpcRequest>>::Future: Send + 'static,
    {
        DynLayer(Arc::new(move |inner| {
            tower::util::BoxCloneSyncService::new(layer.layer(inner))
        }))
    }
}
