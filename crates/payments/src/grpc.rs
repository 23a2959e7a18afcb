//! `agora.payments.v1.PaymentService` over a [`PaymentStore`]: validates
//! requests, decides who may do what, hands the card to the
//! [`CardProcessor`] and maps payments to protobuf.
//!
//! Card numbers: the request is never logged or formatted with `Debug`; the
//! number is parsed into a [`CardNumber`] (whose `Debug` shows the last four
//! digits only) and moved into the provider call, and only the last four
//! digits reach the store.

use std::sync::Arc;

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::money::Money;
use agora_platform::time::micros_to_timestamp;
use agora_proto::payments::v1 as pb;
use agora_proto::payments::v1::payment_service_server::PaymentService;
use tonic::{Request, Response, Status};

use crate::domain::{CardNumber, ChargeAttempt, Payment, PaymentId, PaymentStatus, UserId};
use crate::processor::CardProcessor;
use crate::store::PaymentStore;

/// The gRPC service.
pub struct PaymentApi<S> {
    store: Arc<S>,
    processor: CardProcessor,
    verifier: TokenVerifier,
}

impl<S: PaymentStore> PaymentApi<S> {
    /// The service over `store`, charging through `processor` and checking
    /// callers with `verifier`.
    pub fn new(store: S, processor: CardProcessor, verifier: TokenVerifier) -> Self {
        Self {
            store: Arc::new(store),
            processor,
            verifier,
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        self.verifier.caller(request.metadata())
    }
}

#[tonic::async_trait]
impl<S: PaymentStore> PaymentService for PaymentApi<S> {
    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        // Authorization first: callers that may not charge learn nothing,
        // not even whether their input would have been valid.
        self.caller(&request)?.require_service()?;
        let req = request.into_inner();
        let mut violations = Violations::default();
        let payment_id = violations.check("payment_id", PaymentId::parse(&req.payment_id));
        let user_id = violations.check("user_id", UserId::parse(&req.user_id));
        let amount = Money::check_positive(&mut violations, "amount", req.amount.as_ref());
        let card = violations.check("card_number", CardNumber::parse(&req.card_number));
        violations.finish()?;
        let (Some(payment_id), Some(user_id), Some(amount), Some(card)) =
            (payment_id, user_id, amount, card)
        else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };

        let attempt = ChargeAttempt::new(payment_id, user_id, amount, &card);
        let processor = self.processor;
        let payment = self
            .store
            .charge(&attempt, move || processor.authorize(&card))
            .await?;
        tracing::info!(
            payment_id = %payment.id,
            status = payment.status.as_str(),
            "charge answered"
        );
        if payment.status == PaymentStatus::Declined {
            // A decline is an answer, not a failure of the call; its retry
            // gives the same answer from the stored payment.
            return Err(Error::new(ErrorKind::FailedPrecondition, payment.decline_reason).into());
        }
        Ok(Response::new(pb::ChargeResponse {
            payment: Some(to_proto(&payment)),
        }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        self.caller(&request)?.require_service()?;
        let payment_id = PaymentId::parse(&request.get_ref().payment_id)
            .map_err(|reason| Error::invalid_field("payment_id", reason))?;
        let processor = self.processor;
        let payment = self
            .store
            .refund(payment_id.as_str(), move |payment| {
                processor.refund(payment)
            })
            .await?;
        tracing::info!(payment_id = %payment.id, "refund answered");
        Ok(Response::new(pb::RefundResponse {
            payment: Some(to_proto(&payment)),
        }))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require_authenticated()?;
        if caller.is_service() {
            // The contract lists the paying user and admins only.
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "payments are readable by the paying user and admins",
            )
            .into());
        }
        let id = PaymentId::parse(&request.get_ref().id)
            .map_err(|reason| Error::invalid_field("id", reason))?;
        // Someone else's payment is NOT_FOUND, like an unknown id, so ids
        // cannot be probed.
        let payment = self
            .store
            .get(id.as_str())
            .await?
            .filter(|payment| caller.is_admin() || caller.is_user(&payment.user_id))
            .ok_or_else(|| Error::not_found(format_args!("payment {id}")))?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(to_proto(&payment)),
        }))
    }
}

fn status_to_proto(status: PaymentStatus) -> pb::PaymentStatus {
    match status {
        PaymentStatus::Succeeded => pb::PaymentStatus::Succeeded,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
    }
}

/// The protobuf view of a payment.
pub fn to_proto(payment: &Payment) -> pb::Payment {
    pb::Payment {
        id: payment.id.clone(),
        user_id: payment.user_id.clone(),
        amount: Some(payment.amount.to_proto()),
        status: status_to_proto(payment.status) as i32,
        card_last4: payment.card_last4.clone(),
        decline_reason: payment.decline_reason.clone(),
        created_at: Some(micros_to_timestamp(payment.created_at)),
        updated_at: Some(micros_to_timestamp(payment.updated_at)),
    }
}
