//! Guest network setup over netlink: `lo` up, `eth0` up with the address and default
//! route from the kernel command line. Never shells out to `ip`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::TryStreamExt;

/// Network setup failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink request failed: {what}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {name} did not appear")]
    NoInterface { name: String },
}

async fn link_index(handle: &mut rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: not there (yet).
        Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
        Err(source) => Err(NetError::Netlink {
            what: "get link",
            source,
        }),
    }
}

/// Brings up `lo`, and `eth0` with `ip` and a default route via `gateway` when given.
pub async fn configure(
    ip: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let (conn, mut handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn_task = tokio::spawn(conn);
    let result = async {
        if let Some(lo) = link_index(&mut handle, "lo").await? {
            handle
                .link()
                .set(lo)
                .up()
                .execute()
                .await
                .map_err(|source| NetError::Netlink {
                    what: "set lo up",
                    source,
                })?;
        }
        let Some((addr, prefix)) = ip else {
            return Ok(());
        };
        // The virtio-net probe may finish a moment after its module loaded.
        let mut eth0 = None;
        for _ in 0..100 {
            eth0 = link_index(&mut handle, "eth0").await?;
            if eth0.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let eth0 = eth0.ok_or_else(|| NetError::NoInterface {
            name: "eth0".into(),
        })?;
        match handle
            .address()
            .add(eth0, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => {}
            // EEXIST: already configured (e.g. after a snapshot restore).
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(source) => {
                return Err(NetError::Netlink {
                    what: "add address",
                    source,
                })
            }
        }
        handle
            .link()
            .set(eth0)
            .up()
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: "set eth0 up",
                source,
            })?;
        if let Some(gw) = gateway {
            match handle.route().add().v4().gateway(gw).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        what: "add default route",
                        source,
                    })
                }
            }
        }
        Ok(())
    }
    .await;
    conn_task.abort();
    result
}
