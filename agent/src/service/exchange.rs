//! The hash exchange of a checksum resync, over the disk's channel.

use blockferry_proto::frame::{HashRangeReply, HashRangeRequest};
use blockferry_transport::DiskChannel;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::resync::{HashExchange, ResyncError};

type PendingReply = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<HashRangeReply, blockferry_transport::ChannelError>>
            + Send,
    >,
>;

/// Hash requests and replies over the disk's channel, several in flight.
pub(super) struct ChannelExchange {
    channel: DiskChannel,
    pending: FuturesUnordered<PendingReply>,
}

impl ChannelExchange {
    pub(super) fn new(channel: DiskChannel) -> Self {
        ChannelExchange {
            channel,
            pending: FuturesUnordered::new(),
        }
    }
}

impl HashExchange for ChannelExchange {
    async fn send(&mut self, request: HashRangeRequest) -> Result<(), ResyncError> {
        let channel = self.channel.clone();
        self.pending
            .push(Box::pin(async move { channel.hash_ranges(request).await }));
        Ok(())
    }

    async fn recv(&mut self) -> Result<HashRangeReply, ResyncError> {
        match self.pending.next().await {
            Some(r) => r.map_err(|e| ResyncError::Exchange(e.to_string())),
            None => Err(ResyncError::Exchange("no request in flight".into())),
        }
    }
}
