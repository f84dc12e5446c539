//! Raw message bodies on the wire: undecodable and random bytes for any
//! method, whatever its streaming kind.

/// Sends and receives message bodies as raw bytes, to put undecodable
/// bodies on the wire.
#[derive(Clone, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// Calls `path` with one raw message body, whatever the method's streaming kind.
pub async fn call_raw(
    channel: tonic::transport::Channel,
    method: &prost_types::MethodDescriptorProto,
    path: String,
    body: Vec<u8>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(path).expect("a valid path");
    match (method.client_streaming(), method.server_streaming()) {
        (false, false) => grpc
            .unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(drop),
        (false, true) => {
            let mut stream = grpc
                .server_streaming(tonic::Request::new(body), path, RawCodec)
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        (true, _) => {
            let messages = tokio_stream::iter(vec![body]);
            grpc.client_streaming(tonic::Request::new(messages), path, RawCodec)
                .await
                .map(drop)
        }
    }
}
