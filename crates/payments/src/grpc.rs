//! `agora.payments.v1.PaymentService` over a [`PaymentFlow`]: validates
//! requests, decides who may do what, hands the card to the flow (and so to
//! the [`CardProvider`]), and maps payments and outcomes to protobuf.
//!
//! Card numbers: the request is never logged or formatted with `Debug`; the
//! number is parsed into a [`CardNumber`] (whose `Debug` shows the last four
//! digits only) and lent to the provider call, and only the last four digits
//! reach the store.

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::money::Money;
use agora_platform::time::micros_to_timestamp;
use agora_proto::payments::v1 as pb;
use agora_proto::payments::v1::payment_service_server::PaymentService;
use tonic::{Request, Response, Status};

use crate::domain::{CardNumber, ChargeAttempt, Payment, PaymentId, PaymentStatus, UserId, reason};
use crate::flow::PaymentFlow;
use crate::processor::CardProvider;
use crate::store::PaymentStore;

/// The services that may charge and refund: the checkout saga (and its
/// compensation, and order cancellation) runs in orders.
const PAYMENT_CALLERS: &[&str] = &["orders"];

/// The gRPC service.
pub struct PaymentApi<S, P> {
    flow: PaymentFlow<S, P>,
    verifier: TokenVerifier,
}

impl<S: PaymentStore, P: CardProvider> PaymentApi<S, P> {
    /// The service running `flow`, checking callers with `verifier`.
    pub fn new(flow: PaymentFlow<S, P>, verifier: TokenVerifier) -> Self {
        Self { flow, verifier }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        self.verifier.caller_of(request)
    }
}

#[tonic::async_trait]
impl<S: PaymentStore, P: CardProvider> PaymentService for PaymentApi<S, P> {
    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        // Authorization first: callers that may not charge learn nothing,
        // not even whether their input would have been valid.
        self.caller(&request)?
            .require_service_from(PAYMENT_CALLERS)?;
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
        let payment = self.flow.charge(&attempt, &card).await?;
        // The provider is done with the number: freed before anything else.
        drop(card);
        tracing::info!(
            payment_id = %payment.id,
            status = payment.status.as_str(),
            "charge answered"
        );
        match payment.status {
            PaymentStatus::Succeeded | PaymentStatus::Refunded => {
                Ok(Response::new(pb::ChargeResponse {
                    payment: Some(to_proto(&payment)),
                }))
            }
            // A decline is an answer, not a failure of the call; its retry
            // gives the same answer from the stored payment.
            PaymentStatus::Declined => Err(Error::new(
                ErrorKind::FailedPrecondition,
                payment.decline_reason,
            )
            .with_reason(reason::CARD_DECLINED)
            .into()),
            PaymentStatus::Voided => Err(voided(&payment.id).into()),
            // The flow settles before it answers; seeing this is a bug.
            PaymentStatus::Processing => Err(Error::new(
                ErrorKind::Internal,
                format!("payment {} answered unsettled", payment.id),
            )
            .into()),
        }
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        self.caller(&request)?
            .require_service_from(PAYMENT_CALLERS)?;
        let payment_id = PaymentId::parse(&request.get_ref().payment_id)
            .map_err(|reason| Error::invalid_field("payment_id", reason))?;
        let payment = self.flow.refund(&payment_id).await?;
        tracing::info!(
            payment_id = %payment.id,
            status = payment.status.as_str(),
            "refund answered"
        );
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
            .flow
            .get(&id)
            .await?
            .filter(|payment| caller.is_admin() || caller.is_user(&payment.user_id))
            .ok_or_else(|| Error::not_found(format_args!("payment {id}")))?;
        if payment.status == PaymentStatus::Processing {
            // The contract has no such status: the outcome is being settled
            // (within the charge call, or by the sweeper after a crash).
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("payment {id} is being processed: retry"),
            )
            .into());
        }
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(to_proto(&payment)),
        }))
    }
}

/// FAILED_PRECONDITION for a charge of a voided payment id.
fn voided(payment_id: &str) -> Error {
    Error::new(
        ErrorKind::FailedPrecondition,
        format!(
            "payment {payment_id} was voided (refunded before it was charged) \
             and cannot be charged"
        ),
    )
    .with_reason(reason::PAYMENT_VOIDED)
}

fn status_to_proto(status: PaymentStatus) -> pb::PaymentStatus {
    match status {
        // Never sent: answers wait for the outcome (see `get_payment`).
        PaymentStatus::Processing => pb::PaymentStatus::Unspecified,
        PaymentStatus::Succeeded => pb::PaymentStatus::Succeeded,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
        PaymentStatus::Voided => pb::PaymentStatus::Voided,
    }
}

/// The protobuf view of a payment; a tombstone has no amount.
pub fn to_proto(payment: &Payment) -> pb::Payment {
    pb::Payment {
        id: payment.id.clone(),
        user_id: payment.user_id.clone(),
        amount: (!payment.is_tombstone()).then(|| payment.amount.to_proto()),
        status: status_to_proto(payment.status) as i32,
        card_last4: payment.card_last4.clone(),
        decline_reason: payment.decline_reason.clone(),
        created_at: Some(micros_to_timestamp(payment.created_at)),
        updated_at: Some(micros_to_timestamp(payment.updated_at)),
    }
}
