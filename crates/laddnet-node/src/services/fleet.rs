//! `FleetService`: firmware images and campaigns, diagnostics bundles and
//! site load (see `crate::firmware`, `crate::diagnostics`, `crate::load`).

use std::sync::Arc;
use std::time::Duration;

use laddnet_core::{ChargerId, Role};
use laddnet_proto::v1;
use laddnet_proto::v1::cluster_service_client::ClusterServiceClient;
use laddnet_proto::v1::fleet_service_server::FleetService;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, invalid, require_role, rfc3339};
use crate::diagnostics::Bundle;
use crate::firmware::{self, Campaign, Image};
use crate::state::NodeState;
use crate::status::NodeError;

pub struct Fleet {
    pub state: Arc<NodeState>,
}

fn at(ms: i64) -> String {
    rfc3339(ms.div_euclid(1000))
}

/// A site's load as its actor sees it, for the wire.
pub(crate) fn load_proto(state: &NodeState, site_id: String, l: crate::load::SiteLoad) -> v1::SiteLoadResponse {
    v1::SiteLoadResponse {
        site_id,
        managed_by: state.config.node.name.clone(),
        grid_limit_w: l.grid_limit_w,
        power_w: l.power_w,
        planned_at: if l.planned_at_ms > 0 {
            at(l.planned_at_ms)
        } else {
            String::new()
        },
        sessions: l
            .sessions
            .into_iter()
            .map(|(r, limit, dep)| v1::SessionAllocation {
                transaction_id: r.transaction_id,
                charger_id: r.charger_id,
                connector_id: r.connector_id,
                max_w: r.max_w,
                limit_w: limit.unwrap_or(0),
                power_w: r.power_w,
                departure: dep.map(at).unwrap_or_default(),
            })
            .collect(),
    }
}

fn image_info(i: &Image) -> v1::FirmwareImage {
    v1::FirmwareImage {
        version: i.version.clone(),
        size: i.size,
        sha256: i.sha256.clone(),
        uploaded_at: at(i.uploaded_at_ms),
        signer_serial: i.signer_serial.clone(),
    }
}

fn campaign_info(c: &Campaign) -> v1::Campaign {
    v1::Campaign {
        id: c.id.clone(),
        version: c.version.clone(),
        state: c.state.clone(),
        detail: c.detail.clone(),
        stage: c.stage,
        created_at: at(c.created_ms),
        created_by: c.created_by.clone(),
        canary_percent: c.canary_percent,
        max_failures: c.max_failures,
        chargers: c
            .chargers
            .iter()
            .map(|t| v1::CampaignCharger {
                charger_id: t.charger_id.clone(),
                stage: t.stage,
                state: t.state.clone(),
                detail: t.detail.clone(),
                updated_at: at(t.updated_ms),
            })
            .collect(),
    }
}

fn bundle_info(b: &Bundle, content: Vec<u8>) -> v1::DiagnosticsBundle {
    v1::DiagnosticsBundle {
        id: b.id.clone(),
        charger_id: b.charger_id.clone(),
        file_name: b.file_name.clone(),
        received_at: at(b.received_ms),
        size: b.size,
        sha256: b.sha256.clone(),
        content,
    }
}

fn campaign_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 32 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid(format!("{id:?} is not a campaign id")));
    }
    Ok(())
}

#[tonic::async_trait]
impl FleetService for Fleet {
    async fn upload_firmware(
        &self,
        req: Request<Streaming<v1::FirmwareUpload>>,
    ) -> Result<Response<v1::FirmwareImage>, Status> {
        let (who, _) = require_role(&self.state, &req, "upload firmware (needs admin)", |r| r == Role::Admin)?;
        let mut stream = req.into_inner();
        let version = match stream.message().await? {
            Some(v1::FirmwareUpload {
                part: Some(v1::firmware_upload::Part::Version(v)),
            }) => v,
            _ => return Err(invalid("the first upload message must carry the version")),
        };
        firmware::check_version(&version)?;
        let mut image = Vec::new();
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(v1::firmware_upload::Part::Data(d)) => {
                    if image.len() + d.len() > firmware::MAX_IMAGE {
                        return Err(invalid(format!(
                            "the image is larger than {} MiB",
                            firmware::MAX_IMAGE / 1024 / 1024
                        )));
                    }
                    image.extend_from_slice(&d);
                }
                _ => return Err(invalid("after the version, upload messages carry data only")),
            }
        }
        let signer = {
            let mut slot = self.state.firmware_signer.lock().await;
            match slot.as_ref() {
                Some(s) => s.clone(),
                None => {
                    let (ca, source) = (self.state.ca.clone(), crate::node::key_source(&self.state.config));
                    let s = Arc::new(blocking(move || ca.firmware_signer(&source)).await?);
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        let (store, by) = (self.state.store.clone(), who.actor());
        let img = blocking(move || firmware::store_image(store.as_ref(), &signer, &version, &image, &by)).await?;
        tracing::info!(version = %img.version, size = img.size, "firmware uploaded and signed");
        Ok(Response::new(image_info(&img)))
    }

    async fn list_firmware(
        &self,
        req: Request<v1::ListFirmwareRequest>,
    ) -> Result<Response<v1::ListFirmwareResponse>, Status> {
        require_role(&self.state, &req, "read firmware", |_| true)?;
        let store = self.state.store.clone();
        let all = blocking(move || firmware::list_images(store.as_ref())).await?;
        Ok(Response::new(v1::ListFirmwareResponse {
            images: all.iter().map(image_info).collect(),
        }))
    }

    async fn start_campaign(&self, req: Request<v1::StartCampaignRequest>) -> Result<Response<v1::Campaign>, Status> {
        let (who, _) = require_role(&self.state, &req, "start firmware campaigns", Role::can_operate)?;
        let r = req.into_inner();
        firmware::check_version(&r.version)?;
        for c in &r.charger_ids {
            ChargerId::new(c.clone()).map_err(invalid)?;
        }
        let canary = if r.canary_percent == 0 { 10 } else { r.canary_percent };
        if canary > 100 {
            return Err(invalid("canary_percent must be 1 to 100"));
        }
        let timeout = if r.charger_timeout_s == 0 {
            600
        } else {
            r.charger_timeout_s
        };
        let store = self.state.store.clone();
        let by = who.actor();
        let c = blocking(move || {
            let chargers = if !r.charger_ids.is_empty() {
                for id in &r.charger_ids {
                    if laddnet_actors::repo::get_charger(store.as_ref(), id)
                        .map_err(|e| NodeError::Internal(e.to_string()))?
                        .is_none()
                    {
                        return Err(NodeError::NotFound(format!("no charger {id}")));
                    }
                }
                r.charger_ids.clone()
            } else {
                let (all, _) = laddnet_actors::repo::list_chargers(store.as_ref(), None, usize::MAX)
                    .map_err(|e| NodeError::Internal(e.to_string()))?;
                all.into_iter()
                    .filter(|c| r.site_id.is_empty() || c.site_id.as_deref() == Some(r.site_id.as_str()))
                    .map(|c| c.charger_id)
                    .collect()
            };
            firmware::create_campaign(
                store.as_ref(),
                &r.version,
                chargers,
                canary,
                r.max_failures,
                timeout,
                &by,
            )
        })
        .await?;
        tracing::info!(campaign = %c.id, version = %c.version, chargers = c.chargers.len(), "firmware campaign started");
        tokio::spawn(firmware::drive(self.state.clone(), c.id.clone()));
        Ok(Response::new(campaign_info(&c)))
    }

    async fn get_campaign(&self, req: Request<v1::GetCampaignRequest>) -> Result<Response<v1::Campaign>, Status> {
        require_role(&self.state, &req, "read firmware campaigns", |_| true)?;
        let id = req.into_inner().id;
        campaign_id(&id)?;
        let store = self.state.store.clone();
        let c = blocking(move || {
            firmware::get_campaign(store.as_ref(), &id)?.ok_or_else(|| NodeError::NotFound(format!("no campaign {id}")))
        })
        .await?;
        Ok(Response::new(campaign_info(&c)))
    }

    async fn list_campaigns(
        &self,
        req: Request<v1::ListCampaignsRequest>,
    ) -> Result<Response<v1::ListCampaignsResponse>, Status> {
        require_role(&self.state, &req, "read firmware campaigns", |_| true)?;
        let store = self.state.store.clone();
        let all = blocking(move || firmware::list_campaigns(store.as_ref())).await?;
        Ok(Response::new(v1::ListCampaignsResponse {
            campaigns: all.iter().map(campaign_info).collect(),
        }))
    }

    async fn abort_campaign(&self, req: Request<v1::GetCampaignRequest>) -> Result<Response<v1::Campaign>, Status> {
        let (who, _) = require_role(&self.state, &req, "abort firmware campaigns", Role::can_operate)?;
        let id = req.into_inner().id;
        campaign_id(&id)?;
        let (store, by) = (self.state.store.clone(), who.actor());
        let c = blocking(move || firmware::abort(store.as_ref(), &id, &by)).await?;
        tracing::info!(campaign = %c.id, "firmware campaign aborted");
        Ok(Response::new(campaign_info(&c)))
    }

    async fn request_diagnostics(
        &self,
        req: Request<v1::RequestDiagnosticsRequest>,
    ) -> Result<Response<v1::DiagnosticsBundle>, Status> {
        let (identity, _) = require_role(&self.state, &req, "request diagnostics", Role::can_operate)?;
        let r = req.into_inner();
        let id = ChargerId::new(r.charger_id).map_err(invalid)?;
        let wait = Duration::from_secs(if r.timeout_s == 0 {
            60
        } else {
            u64::from(r.timeout_s.min(3_600))
        });
        let bundle_id = crate::cluster::diagnostics(&self.state, id.as_str(), wait, &identity.actor()).await?;
        let (store, charger) = (self.state.store.clone(), id.to_string());
        let (b, content) =
            blocking(move || crate::diagnostics::load(store.as_ref(), &charger, Some(&bundle_id))).await?;
        Ok(Response::new(bundle_info(&b, content)))
    }

    async fn get_diagnostics(
        &self,
        req: Request<v1::GetDiagnosticsRequest>,
    ) -> Result<Response<v1::DiagnosticsBundle>, Status> {
        require_role(&self.state, &req, "read diagnostics", |_| true)?;
        let r = req.into_inner();
        let id = ChargerId::new(r.charger_id).map_err(invalid)?;
        let store = self.state.store.clone();
        let bundle = (!r.id.is_empty()).then_some(r.id);
        let (b, content) =
            blocking(move || crate::diagnostics::load(store.as_ref(), id.as_str(), bundle.as_deref())).await?;
        Ok(Response::new(bundle_info(&b, content)))
    }

    async fn list_diagnostics(
        &self,
        req: Request<v1::ListDiagnosticsRequest>,
    ) -> Result<Response<v1::ListDiagnosticsResponse>, Status> {
        require_role(&self.state, &req, "read diagnostics", |_| true)?;
        let id = ChargerId::new(req.into_inner().charger_id).map_err(invalid)?;
        let store = self.state.store.clone();
        let all = blocking(move || crate::diagnostics::list(store.as_ref(), id.as_str())).await?;
        Ok(Response::new(v1::ListDiagnosticsResponse {
            bundles: all.iter().map(|b| bundle_info(b, Vec::new())).collect(),
        }))
    }

    async fn site_load(&self, req: Request<v1::SiteLoadRequest>) -> Result<Response<v1::SiteLoadResponse>, Status> {
        require_role(&self.state, &req, "read site load", |_| true)?;
        let site_id = req.into_inner().site_id;
        laddnet_core::SiteId::new(site_id.clone()).map_err(invalid)?;
        if let Some(l) = self.state.load.site_load(&site_id).await {
            return Ok(Response::new(load_proto(&self.state, site_id, l)));
        }
        // Managed by another node of the cluster: ask it.
        let (store, s2) = (self.state.store.clone(), site_id.clone());
        let manager = blocking(move || {
            laddnet_actors::cluster::site_manager(store.as_ref(), &s2, crate::now_ms())
                .map_err(|e| NodeError::Unavailable(e.to_string()))
        })
        .await?;
        let me = self.state.cluster.me();
        if let Some((_, m)) = manager
            && !me.is_some_and(|me| me.node == m.node && me.incarnation == m.incarnation)
        {
            let ch = self.state.cluster.channel(&m).await?;
            let mut r = Request::new(v1::SiteLoadRequest {
                site_id: site_id.clone(),
            });
            r.set_timeout(Duration::from_secs(5));
            match ClusterServiceClient::new(ch).site_load(r).await {
                Ok(load) => return Ok(load),
                // It let the site go meanwhile: answer from the store.
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let (store, s2) = (self.state.store.clone(), site_id.clone());
        let site = blocking(move || {
            laddnet_actors::repo::get_site(store.as_ref(), &s2)
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .ok_or_else(|| NodeError::NotFound(format!("no site {s2}")))
        })
        .await?;
        Ok(Response::new(v1::SiteLoadResponse {
            site_id,
            grid_limit_w: site.grid_limit_w,
            ..Default::default()
        }))
    }
}
